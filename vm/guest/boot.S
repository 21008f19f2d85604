/*
 * ferry workload guest: multiboot v1 entry stub.
 *
 * Entered in 32-bit protected mode (paging off) by a multiboot loader.
 * Under PVM (this project's nested KVM) ring-0 code is emulated ~1000x
 * slower, so this stub does the minimum: identity-map memory with 2 MiB
 * user-accessible pages, enter long mode, install an IDT and a TSS, and
 * drop to 64-bit ring 3 where guest_main (main.c) does all the work.
 */
#define MB_MAGIC   0x1BADB002
#define MB_FLAGS   0x00010003      /* page align, memory info, address fields */
#define STATUS     0x1000
#define PD_COUNT   64              /* 64 page directories: up to 64 GiB mapped */
#define MAX_CPUS   16              /* vCPUs the guest runs a loop on (vm/guest/GUEST.md) */
#define AP_MAGIC   0x46455241      /* EAX of a vCPU the VMM starts as an AP ("FERA") */
#define KSTACK     4096            /* per-CPU ring-0 stack (exceptions only) */
#define USTACK     16384           /* per-CPU ring-3 stack */
#define IDT_VECS   64              /* 32 exceptions, the 16 PIC IRQs at 0x20, 16 LAPIC vectors at 0x30 */
#define ST_TICKS   0xB8            /* status block: timer ticks (vm/guest/GUEST.md) */
#define ST_HZ      0xC0            /* status block: the rate the PIT runs at */
#define PIT_HZ     1193182         /* the 8254's input clock */
#define LAPIC      0xFEE00000      /* local APIC registers (identity-mapped) */
#define SYS_TIMER_START 1          /* ring-3 service (ud2, RAX): program PIC + PIT, RDI = hz */
#define SYS_HALT        2          /* ring-3 service: hlt unless ticks != RDI */
#define SYS_IPI         3          /* ring-3 service: write the LAPIC's ICR (low) with RDI */
#define SYS_AP_TIMER    4          /* ring-3 service (an AP): take the tick IPI, interrupts on */
#define TICK_VECTOR  0x30          /* the IPI the BSP's timer interrupt sends every AP */
#define SPURIOUS     0x3F          /* the LAPICs' spurious vector */
#define LAPIC_SVR  (0x100 | SPURIOUS) /* software-enabled */
#define TRAMPOLINE 0x7000          /* where the BSP copies the AP real-mode entry (SIPI vector 7) */

        .section .multiboot, "a"
        .align 4
mb_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
        .long mb_header            /* header_addr */
        .long _load_start          /* load_addr */
        .long _load_end            /* load_end_addr */
        .long _bss_end             /* bss_end_addr */
        .long _start32             /* entry_addr */

/* KVM paravirt clock off on this CPU (firmware may have left it on); clobbers EAX-EDX. */
        .macro kvmclock_off
        movl    $0x40000000, %eax
        cpuid
        cmpl    $0x4b4d564b, %ebx      /* "KVMK" */
        jne     91f
        cmpl    $0x564b4d56, %ecx      /* "VMKV" */
        jne     91f
        cmpl    $0x0000004d, %edx      /* "M\0\0\0" */
        jne     91f
        xorl    %eax, %eax
        xorl    %edx, %edx
        movl    $0x4b564d01, %ecx      /* MSR_KVM_SYSTEM_TIME_NEW */
        wrmsr
        movl    $0x12, %ecx            /* MSR_KVM_SYSTEM_TIME */
        wrmsr
91:
        .endm

        .text
        .code32
        .globl _start32
_start32:
        cli
        cmpl    $0x2BADB002, %eax
        jne     ap_start32
        /* EDX = AP_MAGIC on the BSP: the VMM starts the APs itself (ferry);
         * otherwise (QEMU) the BSP wakes them with INIT/SIPI. */
        xorl    %ecx, %ecx
        cmpl    $AP_MAGIC, %edx
        sete    %cl
        movl    %ecx, vmm_starts_aps
        movl    %ebx, mbi_ptr
        movl    $kstacks + KSTACK, %esp

        kvmclock_off
        /* How many 2 MiB pages: max(4 GiB, top of RAM), capped by PD_COUNT.
         * Top of RAM: mem_upper, and the end of every RAM range of the
         * multiboot memory map (RAM above the 3-4 GiB hole, vm/guest/GUEST.md). */
        movl    $2048, %ecx
        movl    mbi_ptr, %ebx
        testl   $1, (%ebx)
        jz      12f
        movl    8(%ebx), %eax          /* mem_upper, KiB above 1 MiB */
        addl    $1024 + 2047, %eax
        shrl    $11, %eax              /* 2 MiB pages covering the top */
        cmpl    %ecx, %eax
        jbe     12f
        movl    %eax, %ecx
12:
        testl   $0x40, (%ebx)          /* mmap_length/mmap_addr valid */
        jz      2f
        movl    48(%ebx), %esi         /* mmap_addr */
        movl    44(%ebx), %edi
        addl    %esi, %edi             /* end of the map */
10:
        cmpl    %edi, %esi
        jae     2f
        cmpl    $1, 20(%esi)           /* type 1: RAM */
        jne     11f
        movl    4(%esi), %eax          /* end = base + length, 64-bit in EDX:EAX */
        movl    8(%esi), %edx
        addl    12(%esi), %eax
        adcl    16(%esi), %edx
        addl    $0x1FFFFF, %eax        /* round up to 2 MiB */
        adcl    $0, %edx
        shrdl   $21, %edx, %eax        /* 2 MiB pages covering the end */
        shrl    $21, %edx
        jz      13f
        movl    $0xFFFFFFFF, %eax      /* beyond 2^53: capped below */
13:
        cmpl    %ecx, %eax
        jbe     11f
        movl    %eax, %ecx
11:
        addl    (%esi), %esi           /* next entry: size field + 4 */
        addl    $4, %esi
        jmp     10b
2:
        cmpl    $PD_COUNT * 512, %ecx
        jbe     3f
        movl    $PD_COUNT * 512, %ecx
3:
        /* PD entries: (i << 21) | P|RW|US|PS, high dword i >> 11 */
        movl    $pds, %edi
        xorl    %esi, %esi
4:
        movl    %esi, %eax
        shll    $21, %eax
        orl     $0x87, %eax
        movl    %eax, (%edi)
        movl    %esi, %eax
        shrl    $11, %eax
        movl    %eax, 4(%edi)
        addl    $8, %edi
        incl    %esi
        cmpl    %ecx, %esi
        jb      4b
        /* PDPT entries: one per 512 PD entries */
        addl    $511, %ecx
        shrl    $9, %ecx
        movl    $pdpt, %edi
        movl    $pds + 7, %eax
5:
        movl    %eax, (%edi)
        addl    $4096, %eax
        addl    $8, %edi
        loop    5b
        movl    $pdpt + 7, pml4
        movl    $1, pt_ready           /* APs may enable paging now */
        xorl    %ebx, %ebx             /* CPU index 0 */

enter_long_mode:
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax            /* PAE */
        movl    %eax, %cr4
        movl    $0xC0000080, %ecx      /* EFER */
        rdmsr
        orl     $0x100, %eax           /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80010001, %eax      /* PG | WP | PE */
        movl    %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $0x08, $_start64

/*
 * An AP (a vCPU the VMM starts itself, EAX = AP_MAGIC, or one woken by
 * INIT/SIPI that jumped here): take the next CPU index, wait for the BSP's
 * page tables, then enter long mode like the BSP.
 */
ap_start32:
        kvmclock_off
        /* This CPU's index is its (initial) APIC ID, CPUID.1:EBX[31:24]:
         * ferry gives KVM vCPU i APIC ID i, QEMU -smp N numbers its CPUs
         * 0..N-1, so status slot i is vCPU i (vm/guest/GUEST.md). */
        movl    $1, %eax
        cpuid
        shrl    $24, %ebx              /* EBX = this CPU's index */
        testl   %ebx, %ebx
        jz      ap_park                /* APIC ID 0 is the BSP's */
        cmpl    $MAX_CPUS, %ebx
        jae     ap_park
1:
        pause
        cmpl    $0, pt_ready
        je      1b
        jmp     enter_long_mode
ap_park:                               /* an APIC ID the guest has no slot for */
        hlt
        jmp     ap_park

/*
 * The real-mode entry of an AP woken by INIT/SIPI (stock QEMU, -smp N):
 * guest_main copies these bytes to TRAMPOLINE and sends SIPI vector
 * TRAMPOLINE >> 12, so the AP starts here at CS:IP = 0x0700:0000. It loads
 * a flat 32-bit GDT, enters protected mode and joins ap_start32.
 */
        .code16
        .globl  ap_trampoline, ap_trampoline_end
ap_trampoline:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        lgdtl   TRAMPOLINE + (tramp_gdt_ptr - ap_trampoline)
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $ap_sipi32
        .align  8
tramp_gdt:
        .quad   0
        .quad   0x00CF9A000000FFFF     /* 0x08 code32, flat */
        .quad   0x00CF92000000FFFF     /* 0x10 data, flat */
tramp_gdt_ptr:
        .word   3 * 8 - 1
        .long   TRAMPOLINE + (tramp_gdt - ap_trampoline)
ap_trampoline_end:
        .code32
ap_sipi32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        jmp     ap_start32

        .code64
_start64:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        /* EBX = CPU index: ring-0 stack kstacks + (index + 1) * KSTACK */
        movl    %ebx, %ebx
        movq    %rbx, %rax
        incq    %rax
        shlq    $12, %rax
        leaq    kstacks(%rax), %rsp
        movq    %rsp, %r12             /* rsp0 for this CPU's TSS */

        /* TSS descriptor at GDT 0x28 + 16 * index: base = tss + 104 * index, limit 103, type 0x89. */
        imulq   $104, %rbx, %rax
        leaq    tss(%rax), %r13
        movq    %r13, %rax
        movq    %rbx, %rdi
        shlq    $4, %rdi
        leaq    gdt + 0x28(%rdi), %rdi
        movw    $103, (%rdi)
        movw    %ax, 2(%rdi)
        shrq    $16, %rax
        movb    %al, 4(%rdi)
        movb    $0x89, 5(%rdi)
        movb    $0, 6(%rdi)
        movb    %ah, 7(%rdi)
        shrq    $16, %rax
        movl    %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        movq    %r12, 4(%r13)          /* rsp0 */
        movw    $104, 102(%r13)        /* no I/O bitmap */
        movq    %rbx, %rax
        shlq    $4, %rax
        addq    $0x28, %rax
        ltr     %ax

        testq   %rbx, %rbx
        jnz     ap_idt

        /* IDT: 48 interrupt gates, handler i = vec_stubs + 16 * i; then
         * #UD (6) is the ring-3 service call and IRQ 0 (0x20) the timer. */
        movq    $idt, %rdi
        movq    $vec_stubs, %rsi
        movl    $IDT_VECS, %ecx
6:
        call    set_gate
        addq    $16, %rdi
        addq    $16, %rsi
        loop    6b
        movq    $idt + 6 * 16, %rdi
        movq    $service, %rsi
        call    set_gate
        movq    $idt + 0x20 * 16, %rdi
        movq    $timer_irq, %rsi
        call    set_gate
        movq    $idt + SPURIOUS * 16, %rdi
        movq    $spurious_irq, %rsi
        call    set_gate
        movl    $1, idt_ready
        lidt    idt_ptr

        /* Drop to ring 3: iretq to guest_main(mbi). */
        movl    mbi_ptr, %edi
        pushq   $0x1b                  /* user data, RPL 3 */
        pushq   $ustacks + USTACK
        pushq   $0x2
        pushq   $0x23                  /* user code64, RPL 3 */
        pushq   $guest_main
        iretq

ap_idt:
        pause
        cmpl    $0, idt_ready
        je      ap_idt
        lidt    idt_ptr
        /* Drop to ring 3: iretq to guest_ap_main(index). */
        movq    %rbx, %rdi
        movq    %rbx, %rax
        incq    %rax
        shlq    $14, %rax              /* USTACK */
        leaq    ustacks(%rax), %rax
        pushq   $0x1b
        pushq   %rax
        pushq   $0x2
        pushq   $0x23
        pushq   $guest_ap_main
        iretq

/* Interrupt gate at RDI for the handler at RSI (clobbers RAX). */
set_gate:
        movq    %rsi, %rax
        movw    %ax, (%rdi)
        movw    $0x08, 2(%rdi)
        movw    $0x8E00, 4(%rdi)
        shrq    $16, %rax
        movw    %ax, 6(%rdi)
        shrq    $16, %rax
        movl    %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        ret

/*
 * Ring-3 services (vm/guest/GUEST.md, timer mode): ring 3 cannot program
 * the PIC and PIT or halt, so it executes `ud2` with a function in RAX and
 * lands here (#UD, no error code: the frame is RIP, CS, RFLAGS, RSP, SS).
 */
service:
        cmpq    $SYS_HALT, %rax
        je      sys_halt
        cmpq    $SYS_IPI, %rax
        je      sys_ipi
        cmpq    $SYS_AP_TIMER, %rax
        je      sys_ap_timer
        cmpq    $SYS_TIMER_START, %rax
        je      sys_timer_start
        pushq   $6                     /* a real #UD: fatal */
        jmp     fatal
sys_halt:
        addq    $2, (%rsp)             /* past the ud2 */
        cmpq    %rdi, STATUS + ST_TICKS
        jne     1f                     /* a tick came already: no wait */
        sti                            /* sti; hlt: no tick slips in between */
        hlt
        cli
1:
        iretq
sys_ipi:
        addq    $2, (%rsp)
        pushq   %rcx
        movl    $LAPIC, %ecx
        movl    %edi, 0x300(%rcx)      /* ICR low: sends the IPI */
        popq    %rcx
        iretq
/* An AP in timer mode: software-enable its local APIC so the BSP's tick
 * IPIs reach it, and go on in ring 3 with interrupts on. */
sys_ap_timer:
        addq    $2, (%rsp)
        pushq   %rcx
        movl    $LAPIC, %ecx
        movl    $LAPIC_SVR, 0xF0(%rcx)
        popq    %rcx
        orq     $0x200, 16(%rsp)
        iretq
sys_timer_start:
        addq    $2, (%rsp)
        pushq   %rdx
        pushq   %rcx
        movq    %rdi, STATUS + ST_HZ
        /* Local APIC: software-enabled, LINT0 = ExtINT (the PIC's virtual
         * wire, as firmware leaves it), so the PIC's interrupts reach this CPU. */
        movl    $LAPIC, %ecx
        movl    $LAPIC_SVR, 0xF0(%rcx)
        movl    $0x700, 0x350(%rcx)
        /* PICs: ICW1 edge + ICW4, vectors 0x20 / 0x28, cascade on IRQ 2,
         * 8086 mode; mask everything but IRQ 0. */
        movb    $0x11, %al
        outb    %al, $0x20
        outb    %al, $0xA0
        movb    $0x20, %al
        outb    %al, $0x21
        movb    $0x28, %al
        outb    %al, $0xA1
        movb    $0x04, %al
        outb    %al, $0x21
        movb    $0x02, %al
        outb    %al, $0xA1
        movb    $0x01, %al
        outb    %al, $0x21
        outb    %al, $0xA1
        movb    $0xFE, %al
        outb    %al, $0x21
        movb    $0xFF, %al
        outb    %al, $0xA1
        /* PIT channel 0, lobyte/hibyte, mode 2 (rate generator): divisor = PIT_HZ / hz */
        movb    $0x34, %al
        outb    %al, $0x43
        movl    $PIT_HZ, %eax
        xorl    %edx, %edx
        movq    %rdi, %rcx
        divl    %ecx
        outb    %al, $0x40
        movb    %ah, %al
        outb    %al, $0x40
        popq    %rcx
        popq    %rdx
        orq     $0x200, 16(%rsp)       /* ring 3 goes on with interrupts on */
        iretq

/* IRQ 0: one more tick; end of interrupt to the master PIC; then, once
 * APs take part (tick_ipi), the tick IPI to every other CPU, so an AP
 * halted until the next tick wakes (vm/guest/GUEST.md). */
timer_irq:
        pushq   %rax
        lock incq STATUS + ST_TICKS
        movb    $0x20, %al
        outb    %al, $0x20
        cmpl    $0, tick_ipi
        je      1f
        pushq   %rcx
        movl    $LAPIC, %ecx           /* zero-extended: 0xFEE00000 */
        movl    $0x000C0000 | TICK_VECTOR, 0x300(%rcx) /* ICR: fixed, all excluding self */
        popq    %rcx
1:
        popq    %rax
        iretq

/* The tick IPI (an AP) and any other LAPIC vector: end of interrupt to the
 * local APIC. The AP's clock is the BSP's tick count: nothing else to do. */
lapic_irq:
        pushq   %rcx
        movl    $LAPIC, %ecx
        movl    $0, 0xB0(%rcx)         /* EOI */
        popq    %rcx
        iretq

/* The LAPIC's spurious vector: no end of interrupt. */
spurious_irq:
        iretq

/* Any other IRQ (all masked: spurious): end of interrupt, ignore it. */
other_irq:
        pushq   %rax
        movb    $0x20, %al
        outb    %al, $0xA0
        outb    %al, $0x20
        popq    %rax
        iretq

/* Any exception is fatal: phase = 0xDEAD, record vector and rip, halt. */
        .align 16
vec_stubs:
        .set vec, 0
        .rept 32
        .align 16
        pushq   $vec
        jmp     fatal
        .set vec, vec + 1
        .endr
        .rept 16                       /* 0x20-0x2F: the PICs' IRQs */
        .align 16
        jmp     other_irq
        .endr
        .rept IDT_VECS - 48            /* 0x30-0x3F: LAPIC vectors */
        .align 16
        jmp     lapic_irq
        .endr
fatal:
        popq    %rax                   /* vector */
        movq    %rax, STATUS + 0x80
        /* exceptions 8,10-14,17 push an error code before rip */
        movq    (%rsp), %rdx
        cmpq    $8, %rax
        je      7f
        cmpq    $10, %rax
        jb      8f
        cmpq    $14, %rax
        jbe     7f
        cmpq    $17, %rax
        jne     8f
7:
        movq    %rdx, STATUS + 0x90     /* error code */
        movq    8(%rsp), %rdx
8:
        movq    %rdx, STATUS + 0x88     /* faulting rip */
        movq    $0xDEAD, STATUS + 0x08
9:
        hlt
        jmp     9b

        .data
        .align 16
gdt:
        .quad   0
        .quad   0x00AF9A000000FFFF     /* 0x08 kernel code64 */
        .quad   0x00CF92000000FFFF     /* 0x10 kernel data */
        .quad   0x00CFF2000000FFFF     /* 0x18 user data */
        .quad   0x00AFFA000000FFFF     /* 0x20 user code64 */
        .fill   2 * MAX_CPUS, 8, 0     /* 0x28 + 16 * i: CPU i's TSS (filled at boot) */
gdt_end:
        .align 4
        .word   0
gdt_ptr:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .align 4
        .word   0
idt_ptr:
        .word   IDT_VECS * 16 - 1
        .quad   idt
mbi_ptr:
        .long   0
pt_ready:
        .long   0
idt_ready:
        .long   0
        .globl  tick_ipi
tick_ipi:                              /* nonzero: timer_irq sends APs the tick IPI */
        .long   0
        .globl  vmm_starts_aps
vmm_starts_aps:
        .long   0

        .bss
        .align 4096
pml4:   .skip   4096
pdpt:   .skip   4096
pds:    .skip   4096 * PD_COUNT
idt:    .skip   IDT_VECS * 16
tss:    .skip   104 * MAX_CPUS
        .align 4096
kstacks: .skip  KSTACK * MAX_CPUS
ustacks: .skip  USTACK * MAX_CPUS
