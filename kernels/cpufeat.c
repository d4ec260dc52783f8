/* cpufeat.c -- see cpufeat.h. */
#include "cpufeat.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#include <stdint.h>

int kvck_x86_has(unsigned leaf1_ecx, unsigned leaf7_ebx)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    const unsigned need = bit_OSXSAVE | bit_AVX | leaf1_ecx;
    if ((c & need) != need)
        return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 6u) != 6u)
        return 0;
    if (leaf7_ebx && (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (b & leaf7_ebx) != leaf7_ebx))
        return 0;
    return 1;
}

int kvck_x86_has_avx512(void)
{
    const unsigned need = bit_AVX512F | bit_AVX512DQ | bit_AVX512BW | bit_AVX512VL;
    if (!kvck_x86_has(0, need))
        return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 0xe6u) == 0xe6u;
}
#else
typedef int kvck_cpufeat_unused; /* ISO C wants a declaration in every file */
#endif
