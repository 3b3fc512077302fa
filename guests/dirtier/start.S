/* Entry of Ferry's bare-metal test guests.
 * The VMM enters every vCPU here in 64-bit long mode with paging on (identity map),
 * %rdi = boot-info block, %rsi = vCPU index, %rsp = a per-vCPU stack. */
    .section .text.start, "ax"
    .globl _start
_start:
    cld
    xor %ebp, %ebp
    call guest_main
1:  cli
    hlt
    jmp 1b

/* The local APIC timer's interrupt (vector 32): only wakes a vCPU from `hlt`; end of
 * interrupt to the local APIC, then back. */
    .text
    .globl timer_isr
timer_isr:
    push %rax
    movabs $0xfee000b0, %rax
    movl $0, (%rax)
    pop %rax
    iretq
/* The local APIC's spurious vector: no end of interrupt. */
    .globl spurious_isr
spurious_isr:
    iretq
    .section .note.GNU-stack, "", @progbits
