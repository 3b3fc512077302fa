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
    .section .note.GNU-stack, "", @progbits
