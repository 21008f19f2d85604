/*
 * ferry workload guest, 64-bit ring 3 part (see shared GUEST.md).
 *
 * fill:   every 4-byte word in [2 MiB, mem_top) = fill_word(addr, seed);
 *         with fill=mix, pages are zero, text-like or that (vm/guest/GUEST.md)
 * dirty:  pass k writes (k << 32) | page at byte (k mod 512) * 8 of every
 *         working-set page, in a strided order, paced on the TSC
 * verify: every ms re-check `verify` pages against what fill and pass
 *         arithmetic say must be there
 * cpus:   one dirty loop per vCPU over its own share of the working set
 *         (vm/guest/GUEST.md); vCPU 0 is the BSP, the others arrive through
 *         guest_ap_main, numbered by APIC ID; `rates` paces each loop apart
 * hz:     timer mode: the PIT interrupts the BSP hz times a second, the BSP
 *         passes each tick on to the APs as an IPI, the ticks are the
 *         guest's clock, and every vCPU halts between them
 * memory: RAM below 4 GiB (mem_upper) and, from the multiboot memory map,
 *         RAM above the 3-4 GiB hole; pages are numbered across both
 *         (vm/guest/GUEST.md)
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;
typedef long i64;

#define BASE       0x200000UL
#define PAGE       4096UL
#define STATUS     ((volatile u64 *)0x1000)
#define MAGIC      0x4645525259475354UL

enum {
    ST_MAGIC = 0x00 / 8, ST_PHASE = 0x08 / 8, ST_HEARTBEAT = 0x10 / 8,
    ST_DIRTIED = 0x18 / 8, ST_PASSES = 0x20 / 8, ST_MEM_TOP = 0x40 / 8,
    ST_WSS_PAGES = 0x48 / 8, ST_VERIFIED = 0x60 / 8, ST_VERIFY_ERRORS = 0x70 / 8,
    ST_FIRST_BAD = 0x78 / 8, ST_FATAL_VECTOR = 0x80 / 8, ST_FATAL_RIP = 0x88 / 8,
    ST_FATAL_CODE = 0x90 / 8, ST_FATAL_REASON = 0x98 / 8,
    /* not in GUEST.md: where the dirty loop is (pass, position) for debugging */
    ST_PASS_POS = 0xA0 / 8,
    /* vm/guest/GUEST.md: vCPUs checked in, vCPUs running a loop */
    ST_CPUS_ONLINE = 0xA8 / 8, ST_CPUS = 0xB0 / 8,
    /* vm/guest/GUEST.md, timer mode: ticks taken, the rate asked of the PIT,
     * halts (BSP) */
    ST_TICKS = 0xB8 / 8, ST_HZ = 0xC0 / 8, ST_HALTS = 0xC8 / 8,
    /* vm/guest/GUEST.md: vCPUs checked in (bit i: APIC ID i), halts of the
     * vCPUs running no loop (timer mode) */
    ST_ONLINE_MASK = 0xD0 / 8, ST_IDLE_HALTS = 0xD8 / 8,
    /* vm/guest/GUEST.md: the RAM ranges in use, [start, end) each */
    ST_RAM_RANGES = 0x180 / 8, ST_RAM = 0x188 / 8,
};

/* ring-3 services (boot.S): `ud2` with the function in RAX */
enum { SYS_TIMER_START = 1, SYS_HALT = 2, SYS_IPI = 3, SYS_AP_TIMER = 4 };
/* boot.S: whether the VMM started the APs itself (ferry); the AP real-mode
 * entry the BSP copies below 1 MiB otherwise (QEMU) */
extern volatile u32 vmm_starts_aps;
/* boot.S: nonzero once the BSP's timer interrupt passes each tick on to the
 * APs (an IPI, vector 0x30) */
extern volatile u32 tick_ipi;
extern const u8 ap_trampoline[], ap_trampoline_end[];
#define TRAMPOLINE 0x7000UL
#define MIN_HZ 19       /* the PIT's 16-bit divisor: 1193182 / 19 < 65536 */
#define MAX_HZ 10000

#define MAX_CPUS   16                   /* as boot.S */
#define CPU_TABLE  0x200UL              /* vCPU i >= 1: 0x200 + 0x40 * (i - 1) */
#define CPU_ENTRY  0x40UL
/* one vCPU's counters; vCPU 0 keeps the shared GUEST.md offsets */
enum { C_HEARTBEAT, C_DIRTIED, C_PASSES, C_VERIFIED, C_VERIFY_ERRORS, C_FIRST_BAD,
       C_PASS_POS, C_HALTS, C_FIELDS };
static const u64 cpu0_field[C_FIELDS] = { 0x10, 0x18, 0x20, 0x60, 0x70, 0x78, 0xA0, 0xC8 };

enum { PHASE_BOOT = 0, PHASE_FILLING = 1, PHASE_RUNNING = 2, PHASE_FATAL = 0xDEAD };
enum { FILL_NONE = 0, FILL_RANDOM = 1, FILL_MIX = 2 };
enum { REASON_BAD_CMDLINE = 1, REASON_NO_TSC_KHZ = 2, REASON_NO_MEMORY = 3 };

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
    u32 mods_count, mods_addr, syms[4], mmap_length, mmap_addr;
};
/* one multiboot memory map entry; `size` does not count itself */
struct __attribute__((packed)) mb_mmap { u32 size; u64 base, length; u32 type; };

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static void fatal(u64 reason)
{
    STATUS[ST_FATAL_REASON] = reason;
    STATUS[ST_PHASE] = PHASE_FATAL;
    for (;;)
        __asm__ volatile("pause");
}

/* murmur3 64-bit finalizer: a bijection, so words differ address by address. */
static inline u32 fill_word(u64 addr, u64 seed)
{
    u64 x = (addr >> 2) ^ (seed * 0x9E3779B97F4A7C15UL);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53UL;
    x ^= x >> 33;
    u32 w = (u32)x;
    return w ? w : 1;
}

static u64 gcd(u64 a, u64 b)
{
    while (b) { u64 t = a % b; a = b; b = t; }
    return a;
}

/* inverse of a modulo n (gcd(a, n) == 1) */
static u64 inverse_mod(u64 a, u64 n)
{
    i64 t = 0, nt = 1;
    i64 r = (i64)n, nr = (i64)(a % n);
    while (nr) {
        i64 q = r / nr, tmp;
        tmp = t - q * nt; t = nt; nt = tmp;
        tmp = r - q * nr; r = nr; nr = tmp;
    }
    if (t < 0) t += (i64)n;
    return (u64)t;
}

/* ---- command line ---- */
struct params {
    u64 wss_bytes;   /* 0 = all */
    u64 rate;        /* pages/s; 0 none */
    int rate_max;
    u64 tsc_khz;
    u64 seed;
    int fill;        /* FILL_NONE, FILL_RANDOM or FILL_MIX */
    u64 verify;
    u64 mix_zero;    /* fill=mix: percent of pages that are zero */
    u64 mix_text;    /* fill=mix: percent of pages that are text-like */
    u64 cpus;        /* vCPUs to wait for (up to 2 s) before the loops start */
    u64 hz;          /* timer mode: PIT interrupts per second; 0 off */
    u64 rates[MAX_CPUS]; /* `rates`: each loop's own pages/s */
    u64 nrates;      /* how many `rates` gave; 0: loops split `rate` */
};

static int streq(const char *a, const char *b, u64 n)
{
    for (u64 i = 0; i < n; i++)
        if (a[i] != b[i] || !b[i]) return 0;
    return b[n] == 0;
}

/* number with optional K/M/G suffix; `unit` applies when there is none */
static int parse_num(const char *s, u64 n, u64 unit, u64 *out)
{
    u64 v = 0, i = 0;
    if (n == 0) return 0;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (u64)(s[i] - '0');
    if (i == 0) return 0;
    if (i == n) { *out = v * unit; return 1; }
    if (i + 1 != n) return 0;
    switch (s[i]) {
    case 'K': case 'k': *out = v << 10; return 1;
    case 'M': case 'm': *out = v << 20; return 1;
    case 'G': case 'g': *out = v << 30; return 1;
    }
    return 0;
}

static void parse_cmdline(const char *c, struct params *p)
{
    while (c && *c) {
        while (*c == ' ') c++;
        if (!*c) break;
        const char *key = c;
        while (*c && *c != '=' && *c != ' ') c++;
        u64 klen = (u64)(c - key);
        if (*c != '=') {
            /* a bare word: the kernel path QEMU passes first is fine; skip it */
            continue;
        }
        c++;
        const char *val = c;
        while (*c && *c != ' ') c++;
        u64 vlen = (u64)(c - val);
        int ok = 1;
        if (streq(key, "wss", klen)) {
            if (streq(val, "all", vlen)) p->wss_bytes = 0;
            else ok = parse_num(val, vlen, 1UL << 20, &p->wss_bytes);
        } else if (streq(key, "rate", klen)) {
            if (streq(val, "max", vlen)) p->rate_max = 1;
            else ok = parse_num(val, vlen, 1, &p->rate);
        } else if (streq(key, "tsc_khz", klen)) {
            ok = parse_num(val, vlen, 1, &p->tsc_khz);
        } else if (streq(key, "seed", klen)) {
            ok = parse_num(val, vlen, 1, &p->seed);
        } else if (streq(key, "fill", klen)) {
            u64 f = 1;
            if (streq(val, "mix", vlen)) {
                p->fill = FILL_MIX;
            } else {
                ok = parse_num(val, vlen, 1, &f);
                p->fill = f != 0 ? FILL_RANDOM : FILL_NONE;
            }
        } else if (streq(key, "mix_zero", klen)) {
            ok = parse_num(val, vlen, 1, &p->mix_zero);
        } else if (streq(key, "mix_text", klen)) {
            ok = parse_num(val, vlen, 1, &p->mix_text);
        } else if (streq(key, "verify", klen)) {
            ok = parse_num(val, vlen, 1, &p->verify);
        } else if (streq(key, "cpus", klen)) {
            ok = parse_num(val, vlen, 1, &p->cpus) && p->cpus >= 1;
        } else if (streq(key, "rates", klen)) {
            /* rates=R0,R1,...: loop i dirties Ri pages/s (vm/guest/GUEST.md) */
            p->nrates = 0;
            u64 at = 0;
            while (ok && at < vlen) {
                u64 end = at;
                while (end < vlen && val[end] != ',') end++;
                ok = p->nrates < MAX_CPUS && parse_num(val + at, end - at, 1, &p->rates[p->nrates]);
                p->nrates++;
                at = end + 1;
                if (end + 1 == vlen) ok = 0; /* a trailing comma */
            }
            if (vlen == 0) ok = 0;
        } else if (streq(key, "hz", klen)) {
            ok = parse_num(val, vlen, 1, &p->hz)
                 && (p->hz == 0 || (p->hz >= MIN_HZ && p->hz <= MAX_HZ));
        }
        /* unknown keys are ignored: the VMM validates what it passes */
        if (!ok) fatal(REASON_BAD_CMDLINE);
    }
    if (p->mix_zero + p->mix_text > 100) fatal(REASON_BAD_CMDLINE);
}

/* ---- the workload ---- */
static u64 mem_top, wss_pages, seed;
/* RAM in use: [BASE, low_top) then [high_base, high_base + high_pages pages) */
static u64 low_pages, high_base, high_pages;

/* Address of page p, counting from BASE across the hole. */
static inline u64 page_addr(u64 p)
{
    return p < low_pages ? BASE + p * PAGE : high_base + (p - low_pages) * PAGE;
}

/* One vCPU's loop: its share of the working set and of the rest (verified only). */
struct share {
    volatile u64 *f[C_FIELDS]; /* counters in the status block */
    u64 first, pages;          /* working-set pages [first, first + pages) */
    u64 stride, stride_inv;    /* walk order within the share */
    u64 rest_first, rest_pages; /* pages past the working set it verifies */
    u64 rate;                  /* its part of `rate`, or its `rates` entry */
    int rate_max;              /* unpaced (`rate=max`) */
};

/* ---- fill=mix: memory like a real guest's (vm/guest/GUEST.md) ---- */
enum { PAGE_RANDOM = 0, PAGE_ZERO = 1, PAGE_TEXT = 2 };
static int fill_mode;
static u64 mix_zero, mix_text;

/* Each page's content class, a pure function of its address and the seed
 * (the top address bit keeps it apart from the words' own values). */
static inline int page_class(u64 page_addr)
{
    if (fill_mode != FILL_MIX) return PAGE_RANDOM;
    u64 r = fill_word(page_addr | (1UL << 63), seed) % 100;
    if (r < mix_zero) return PAGE_ZERO;
    if (r < mix_zero + mix_text) return PAGE_TEXT;
    return PAGE_RANDOM;
}

static const char *const text_words[] = {
    "the", "of", "and", "to", "in", "is", "for", "return", "if", "else",
    "static", "int", "struct", "const", "void", "unsigned", "char", "page",
    "memory", "kernel", "file", "data", "error", "value", "size", "buffer",
    "while", "count", "next", "list", "user", "time", "read", "write",
    "open", "close", "lock", "state", "node", "with", "from", "that",
    "this", "not", "are", "on", "be", "by", "at", "as", "or", "it", "NULL",
    "{", "}", "(", ");", "=", "->", "0", "1", "#include", "/*", "*/",
};
#define TEXT_WORDS (sizeof(text_words) / sizeof(text_words[0]))

static inline u64 xorshift(u64 *s)
{
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* A text-like page (words, separators, now and then a number), like the
 * page cache's text and code: a pure function of its address and the seed,
 * different page by page. */
static void text_page(u64 page_addr, u8 *out)
{
    u64 s = ((u64)fill_word(page_addr | (1UL << 62), seed) << 32)
          | fill_word(page_addr | (3UL << 62), seed);
    u64 n = 0, col = 0;
    if (!s) s = 1;
    while (n < PAGE) {
        u64 r = xorshift(&s);
        const char *w;
        char num[8];
        if ((r & 31) == 0) {
            /* a number: 5 digits of noise */
            u64 v = r >> 8;
            for (int i = 0; i < 5; i++) { num[i] = (char)('0' + v % 10); v /= 10; }
            num[5] = 0;
            w = num;
        } else {
            /* Zipf-ish: the smaller of two draws, so common words dominate */
            u64 a = (r >> 8) % TEXT_WORDS, b = (r >> 24) % TEXT_WORDS;
            w = text_words[a < b ? a : b];
        }
        for (; *w && n < PAGE; w++, col++) out[n++] = (u8)*w;
        if (n < PAGE) {
            if (col > 60 + (r >> 40) % 20) { out[n++] = '\n'; col = 0; }
            else { out[n++] = ' '; col++; }
        }
    }
}

/* Writes the page at page_addr as the fill leaves it. */
static void fill_page(u64 page_addr)
{
    switch (page_class(page_addr)) {
    case PAGE_ZERO:
        for (u64 i = 0; i < PAGE; i += 8) *(volatile u64 *)(page_addr + i) = 0;
        break;
    case PAGE_TEXT: {
        u8 buf[PAGE];
        text_page(page_addr, buf);
        for (u64 i = 0; i < PAGE; i += 8) {
            u64 v = 0;
            for (u64 b = 0; b < 8; b++) v |= (u64)buf[i + b] << (b * 8);
            *(volatile u64 *)(page_addr + i) = v;
        }
        break;
    }
    default:
        for (u64 a = page_addr; a < page_addr + PAGE; a += 4)
            *(volatile u32 *)a = fill_word(a, seed);
    }
}

static struct share shares[MAX_CPUS];
static struct params prm;
static volatile u64 cpus_online = 1; /* the BSP, then each AP as it arrives */
static volatile u64 online_mask = 1; /* bit i: the vCPU with APIC ID i checked in */
static volatile u64 cpus_go;         /* loops to run; 0 until the BSP says go */

/* where page p (index within the share) comes in a pass */
static inline u64 position_of(const struct share *s, u64 p)
{
    return (p * s->stride_inv) % s->pages; /* < 2^48: at most 2^24 pages */
}

static int verify_page(struct share *s, u64 page, u64 pass, u64 pos)
{
    u64 addr = page_addr(page);
    volatile u64 *w = (volatile u64 *)addr;
    int in_wss = page >= s->first && page < s->first + s->pages;
    /* last pass that wrote this page: passes [0, last] have written it */
    i64 last = -1;
    if (in_wss)
        last = position_of(s, page - s->first) < pos ? (i64)pass : (i64)pass - 1;
    int class = page_class(addr);
    u8 text[PAGE];
    if (class == PAGE_TEXT) text_page(addr, text);
    for (u64 slot = 0; slot < 512; slot++) {
        u64 a = addr + slot * 8;
        u64 expect = 0;
        if (class == PAGE_RANDOM)
            expect = ((u64)fill_word(a + 4, seed) << 32) | fill_word(a, seed);
        else if (class == PAGE_TEXT)
            for (u64 b = 0; b < 8; b++) expect |= (u64)text[slot * 8 + b] << (b * 8);
        if (last >= 0) {
            /* the newest pass k <= last with k mod 512 == slot */
            i64 k = last - (i64)(((u64)last - slot) % 512);
            if ((u64)last >= slot && k >= 0)
                expect = ((u64)k << 32) | page;
        }
        u64 got = w[slot];
        if (got != expect) {
            if (*s->f[C_VERIFY_ERRORS] == 0) *s->f[C_FIRST_BAD] = a;
            *s->f[C_VERIFY_ERRORS] += 1;
            return 0;
        }
    }
    return 1;
}

static void start_loops(u64 total_pages);
static void run(struct share *s);
void guest_ap_main(u64 cpu);
void guest_main(struct mb_info *mbi);

void guest_main(struct mb_info *mbi)
{
    struct params p = { 0, 0, 0, 0, 1, FILL_RANDOM, 256, 40, 30, 1, 0, { 0 }, 0 };
    volatile u64 *st = STATUS;
    st[ST_PHASE] = PHASE_BOOT;
    st[ST_MAGIC] = MAGIC;

    if (mbi->flags & 4) parse_cmdline((const char *)(u64)mbi->cmdline, &p);
    if (!(mbi->flags & 1)) fatal(REASON_NO_MEMORY);
    mem_top = ((u64)mbi->mem_upper + 1024) * 1024;
    mem_top &= ~(PAGE - 1);
    if (mem_top > 64UL << 30) mem_top = 64UL << 30;
    if (mem_top <= BASE + PAGE) fatal(REASON_NO_MEMORY);
    low_pages = (mem_top - BASE) / PAGE;
    /* RAM above the hole: the lowest RAM range of the memory map that
     * starts at or above 4 GiB (and above mem_upper's top) */
    if (mbi->flags & 0x40) {
        u64 at = mbi->mmap_addr, end = at + mbi->mmap_length, best = 0, best_end = 0;
        while (at + sizeof(struct mb_mmap) <= end) {
            const struct mb_mmap *e = (const struct mb_mmap *)at;
            u64 lo = (e->base + PAGE - 1) & ~(PAGE - 1);
            u64 hi = (e->base + e->length) & ~(PAGE - 1);
            if (hi > 64UL << 30) hi = 64UL << 30;
            if (e->type == 1 && lo >= (4UL << 30) && lo >= mem_top && hi > lo
                && (!best || lo < best)) {
                best = lo;
                best_end = hi;
            }
            at += (u64)e->size + 4;
        }
        if (best) {
            high_base = best;
            high_pages = (best_end - best) / PAGE;
            mem_top = best_end;
        }
    }
    st[ST_RAM_RANGES] = high_pages ? 2 : 1;
    st[ST_RAM + 0] = BASE;
    st[ST_RAM + 1] = BASE + low_pages * PAGE;
    st[ST_RAM + 2] = high_base;
    st[ST_RAM + 3] = high_base + high_pages * PAGE;
    seed = p.seed;
    fill_mode = p.fill;
    mix_zero = p.mix_zero;
    mix_text = p.mix_text;

    if (!p.tsc_khz) {
        /* KVM/VMware timing leaf: TSC kHz in EAX */
        u32 a, b, c, d;
        cpuid(0x40000000, &a, &b, &c, &d);
        if (a >= 0x40000010) {
            cpuid(0x40000010, &a, &b, &c, &d);
            p.tsc_khz = a;
        }
    }
    if (!p.tsc_khz) {
        u64 paced = p.rate && !p.rate_max;
        for (u64 i = 0; i < p.nrates; i++) paced |= p.rates[i];
        if (paced && !p.hz) fatal(REASON_NO_TSC_KHZ);
        p.tsc_khz = 1000000; /* only the heartbeat's millisecond depends on it */
    }

    u64 total_pages = low_pages + high_pages;
    wss_pages = p.wss_bytes ? p.wss_bytes / PAGE : total_pages;
    if (wss_pages > total_pages) wss_pages = total_pages;
    if (wss_pages == 0) wss_pages = 1;

    st[ST_MEM_TOP] = mem_top;
    st[ST_WSS_PAGES] = wss_pages;
    st[ST_DIRTIED] = 0;
    st[ST_PASSES] = 0;
    st[ST_HEARTBEAT] = 0;
    st[ST_VERIFIED] = 0;
    st[ST_VERIFY_ERRORS] = 0;
    st[ST_FIRST_BAD] = 0;
    st[ST_TICKS] = 0;
    st[ST_HZ] = 0;
    st[ST_HALTS] = 0;
    st[ST_IDLE_HALTS] = 0;

    /* each RAM range: [BASE, low top), then above the hole if any */
    u64 range[2][2] = { { BASE, BASE + low_pages * PAGE },
                        { high_base, high_base + high_pages * PAGE } };
    for (int r = 0; r < 2; r++) {
        if (p.fill == FILL_RANDOM) {
            st[ST_PHASE] = PHASE_FILLING;
            for (u64 a = range[r][0]; a < range[r][1]; a += 4)
                *(volatile u32 *)a = fill_word(a, seed);
        } else if (p.fill == FILL_MIX) {
            st[ST_PHASE] = PHASE_FILLING;
            for (u64 a = range[r][0]; a < range[r][1]; a += PAGE)
                fill_page(a);
        }
    }
    prm = p;
    if (p.hz) /* ring 0 programs the PIC and PIT and enables interrupts */
        __asm__ volatile("ud2" : : "a"((u64)SYS_TIMER_START), "D"(p.hz) : "memory");
    start_loops(total_pages);
    st[ST_PHASE] = PHASE_RUNNING;
    run(&shares[0]);
}

/* The share of n among `cpus` loops: [total * i / cpus, total * (i + 1) / cpus). */
static u64 part(u64 total, u64 i, u64 cpus)
{
    return total / cpus * i + total % cpus * i / cpus;
}

static void set_walk(struct share *s)
{
    if (s->pages <= 1) {
        s->stride = 0;
        s->stride_inv = 0;
        return;
    }
    u64 stride = s->pages * 618 / 1000 + 1;
    while (gcd(stride, s->pages) != 1) stride++;
    s->stride = stride % s->pages;
    s->stride_inv = inverse_mod(s->stride, s->pages);
}

static void wait_us(u64 us)
{
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < us * prm.tsc_khz / 1000)
        __asm__ volatile("pause");
}

static void send_ipi(u64 icr)
{
    __asm__ volatile("ud2" : : "a"((u64)SYS_IPI), "D"(icr) : "memory");
}

/* Firmware (QEMU's) left the APs parked: wake them as an OS does, INIT
 * then SIPI twice to every CPU but this one, into the real-mode entry
 * copied to TRAMPOLINE (vm/guest/GUEST.md). */
static void wake_aps(void)
{
    volatile u8 *to = (volatile u8 *)TRAMPOLINE;
    for (const u8 *b = ap_trampoline; b < ap_trampoline_end; b++)
        *to++ = *b;
    send_ipi(0x000C4500);                       /* INIT, assert, all but self */
    wait_us(10000);
    send_ipi(0x000C4600 | (TRAMPOLINE >> 12));  /* SIPI */
    wait_us(200);
    send_ipi(0x000C4600 | (TRAMPOLINE >> 12));  /* SIPI again, as the MP spec says */
}

/* vCPUs 0..n-1 (by APIC ID) all checked in: n */
static u64 online_prefix(void)
{
    u64 m = online_mask, n = 0;
    while (n < MAX_CPUS && (m >> n) & 1) n++;
    return n;
}

/* Waits (up to 2 s) for vCPUs 0..cpus-1 to check in, splits the work among
 * those of them that did (vCPU i runs loop i), and lets the APs go. */
static void start_loops(u64 total_pages)
{
    volatile u64 *st = STATUS;
    u64 want = prm.cpus > MAX_CPUS ? MAX_CPUS : prm.cpus;
    if (want > 1 && !vmm_starts_aps)
        wake_aps();
    u64 t0 = rdtsc();
    while (online_prefix() < want && rdtsc() - t0 < 2000 * prm.tsc_khz)
        __asm__ volatile("pause");
    u64 n = online_prefix();
    if (n > want) n = want;
    u64 rest = total_pages - wss_pages;
    for (u64 i = 0; i < n; i++) {
        struct share *s = &shares[i];
        for (u64 f = 0; f < C_FIELDS; f++) {
            u64 off = i == 0 ? cpu0_field[f] : CPU_TABLE + CPU_ENTRY * (i - 1) + 8 * f;
            s->f[f] = (volatile u64 *)(0x1000UL + off);
            *s->f[f] = 0;
        }
        s->first = part(wss_pages, i, n);
        s->pages = part(wss_pages, i + 1, n) - s->first;
        s->rest_first = wss_pages + part(rest, i, n);
        s->rest_pages = wss_pages + part(rest, i + 1, n) - s->rest_first;
        if (prm.nrates) {
            s->rate = i < prm.nrates ? prm.rates[i] : 0;
            s->rate_max = 0;
        } else {
            s->rate = part(prm.rate, i + 1, n) - part(prm.rate, i, n);
            s->rate_max = prm.rate_max;
        }
        set_walk(s);
    }
    st[ST_CPUS_ONLINE] = cpus_online;
    st[ST_ONLINE_MASK] = online_mask;
    st[ST_CPUS] = n;
    /* Timer mode: from now on every tick wakes the APs too */
    if (prm.hz && cpus_online > 1)
        tick_ipi = 1;
    __atomic_store_n(&cpus_go, n, __ATOMIC_RELEASE);
}

static void halt_until_tick(u64 seen)
{
    __asm__ volatile("ud2" : : "a"((u64)SYS_HALT), "D"(seen) : "memory");
}

/* An AP in ring 3 (boot.S), `cpu` its APIC ID: check in, wait for the
 * BSP, run loop `cpu` if there is one. */
void guest_ap_main(u64 cpu)
{
    __atomic_fetch_or(&online_mask, 1UL << cpu, __ATOMIC_ACQ_REL);
    __atomic_fetch_add(&cpus_online, 1, __ATOMIC_ACQ_REL);
    u64 n;
    while ((n = __atomic_load_n(&cpus_go, __ATOMIC_ACQUIRE)) == 0)
        __asm__ volatile("pause");
    if (prm.hz) /* take the BSP's tick IPIs from now on */
        __asm__ volatile("ud2" : : "a"((u64)SYS_AP_TIMER) : "memory");
    if (cpu < n)
        run(&shares[cpu]);
    for (;;) { /* not needed: more vCPUs than `cpus` */
        if (prm.hz) {
            halt_until_tick(STATUS[ST_TICKS]);
            __atomic_fetch_add(&STATUS[ST_IDLE_HALTS], 1, __ATOMIC_RELAXED);
        } else {
            __asm__ volatile("pause");
        }
    }
}

/* The guest's clock: the TSC, or in timer mode the ticks (1000 units a
 * tick, so `hz` units a millisecond). */
static inline u64 clock_now(void)
{
    if (prm.hz) return STATUS[ST_TICKS] * 1000;
    return rdtsc();
}

/* Timer mode, nothing to do until the clock moves on from `now`: halt
 * until the next tick (ring 0 checks the ticks again with interrupts off,
 * so a tick that came meanwhile is not waited for). The BSP wakes on the
 * PIT's interrupt, an AP on the tick IPI the BSP sends it after counting
 * the tick. */
static void idle(const struct share *s, u64 now)
{
    halt_until_tick(now / 1000);
    *s->f[C_HALTS] += 1;
}

/* The dirty loop and self-check of one vCPU, forever. */
static void run(struct share *s)
{
    const struct params *p = &prm;
    const u64 tick = p->hz ? p->hz : p->tsc_khz; /* clock units per ms */
    u64 start = clock_now(), last_ms = start;
    u64 written = 0;                       /* writes since start (pacing) */
    u64 pass = 0, pos = 0, cur = 0;        /* cur = share page at pos */
    u64 vpage = 0;                         /* next page to verify */
    u64 verify_total = s->pages + s->rest_pages;
    if (!p->fill) verify_total = 0;        /* nothing known to check without a fill */

    for (;;) {
        u64 now = clock_now();
        if (now - last_ms >= tick) {
            last_ms = now;
            *s->f[C_HEARTBEAT] += 1;
            for (u64 i = 0; i < p->verify && verify_total; i++) {
                u64 page = vpage < s->pages ? s->first + vpage
                                            : s->rest_first + (vpage - s->pages);
                verify_page(s, page, pass, pos);
                *s->f[C_VERIFIED] += 1;
                if (++vpage == verify_total) vpage = 0;
            }
        }
        if ((!s->rate && !s->rate_max) || !s->pages) {
            if (p->hz) idle(s, now);
            continue;
        }
        /* pages allowed by now: rate * elapsed */
        u64 budget;
        if (s->rate_max) {
            budget = 64;
        } else {
            u64 el = now - start;
            u64 allowed = (el / tick) * s->rate / 1000 + (el % tick) * s->rate / (tick * 1000);
            budget = allowed > written ? allowed - written : 0;
            if (budget > 4096) { /* after a pause (migration), do not burst */
                written = allowed - 4096;
                budget = 4096;
            }
            if (budget > 64) budget = 64;
        }
        for (u64 i = 0; i < budget; i++) {
            u64 page = s->first + cur;
            volatile u64 *w = (volatile u64 *)(page_addr(page) + (pass % 512) * 8);
            *w = (pass << 32) | page;
            written++;
            *s->f[C_DIRTIED] += 1;
            cur += s->stride;
            if (cur >= s->pages) cur -= s->pages;
            if (++pos == s->pages) {
                pos = 0;
                cur = 0;
                pass++;
                *s->f[C_PASSES] = pass;
            }
            *s->f[C_PASS_POS] = (pass << 32) | pos;
        }
        if (p->hz && budget == 0) idle(s, now);
    }
}
