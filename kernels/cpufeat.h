/*
 * cpufeat.h -- run-time x86 feature checks for the kernels' intrinsic
 * paths (the library is built for the baseline ISA). Internal to kvck.
 */
#ifndef KVCK_CPUFEAT_H
#define KVCK_CPUFEAT_H

#if defined(__GNUC__) && defined(__x86_64__)
/* 1 when the VEX/YMM state is usable (CPUID OSXSAVE + AVX, and the OS saves
 * XMM and YMM: XCR0 bits 1 and 2) and every bit of leaf1_ecx (CPUID leaf 1,
 * ECX: bit_F16C, bit_FMA) and of leaf7_ebx (leaf 7, EBX: bit_AVX2) is set.
 * Cached per bit set is the caller's job; this asks the CPU each time. */
int kvck_x86_has(unsigned leaf1_ecx, unsigned leaf7_ebx);

/* 1 when AVX-512 F, BW, VL and DQ are usable: the CPUID leaf 7 bits and
 * the OS saving the opmask and ZMM state (XCR0 bits 5, 6, 7) besides YMM. */
int kvck_x86_has_avx512(void);
#endif

#endif
