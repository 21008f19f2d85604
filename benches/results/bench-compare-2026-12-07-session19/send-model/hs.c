#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <time.h>
#include <stdint.h>
#include <sys/mman.h>
static double tcpu(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
size_t TOTAL=(size_t)1<<30; char*mem; int port;
volatile uint64_t sink;
static uint64_t readpass(const char*p,size_t n){uint64_t s=0;const uint64_t*q=(const uint64_t*)p;for(size_t i=0;i<n/8;i+=8) s+=q[i]^q[i+1]^q[i+2]^q[i+3]^q[i+4]^q[i+5]^q[i+6]^q[i+7];return s;}
double rcpu;
void*rx(void*a){int l=*(int*)a;int c=accept(l,0,0);char*b=malloc(1<<20);double c0=tcpu();size_t got=0;while(got<TOTAL){ssize_t n=read(c,b,1<<20);if(n<=0)break;got+=n;}rcpu=tcpu()-c0;close(c);return 0;}
int main(int argc,char**argv){
  size_t hashchunk=atol(argv[1])<<10, sendchunk=atol(argv[2])<<10; int lag=atoi(argv[3]);
  mem=mmap(0,TOTAL,3,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); for(size_t i=0;i<TOTAL;i+=8) *(uint64_t*)(mem+i)=i*2654435761u;
  int l=socket(AF_INET,SOCK_STREAM,0);struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)};bind(l,(void*)&a,sizeof a);listen(l,1);socklen_t al=sizeof a;getsockname(l,(void*)&a,&al);
  pthread_t t;pthread_create(&t,0,rx,&l);
  int s=socket(AF_INET,SOCK_STREAM,0);connect(s,(void*)&a,sizeof a);
  double c0=tcpu(),w0=now(),hc=0;
  // hash `lag` chunks ahead of sending
  size_t hashed=0;
  for(size_t off=0;off<TOTAL;off+=sendchunk){
    while(hashed<TOTAL && hashed < off+sendchunk+ (size_t)lag*hashchunk){double h0=tcpu();sink+=readpass(mem+hashed,hashchunk);hc+=tcpu()-h0;hashed+=hashchunk;}
    size_t done=0;while(done<sendchunk){ssize_t n=send(s,mem+off+done,sendchunk-done,0);if(n<=0){perror("send");return 1;}done+=n;}
  }
  double sc=tcpu()-c0; shutdown(s,SHUT_WR); pthread_join(t,0);
  printf("hash %zuK send %zuK lag %d: sender cpu %.3f (hash %.3f, send %.3f) receiver %.3f wall %.3f\n",hashchunk>>10,sendchunk>>10,lag,sc,hc,sc-hc,rcpu,now()-w0);
}
