/*
 * isa.c -- which instruction-set path the quantized-store kernels take.
 *
 * Chosen once from CPUID (the library is built for the baseline ISA),
 * capped by KVCK_ISA=generic|avx2|avx512 so tests and benchmarks can run
 * every path on one machine; kvck_isa_set() moves the cap later.
 */
#include "kvck_quant.h"

#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(KVCK_GENERIC_ONLY)
#include <cpuid.h>
#include "cpufeat.h"
#define KVCK_ISA_X86 1
#endif

/* Best path the CPU allows. */
static int cpu_isa(void)
{
#ifdef KVCK_ISA_X86
    /* Every fast path also uses F16C (scales and fp16 rows) and FMA. */
    if (!kvck_x86_has(bit_FMA | bit_F16C, bit_AVX2))
        return KVCK_ISA_GENERIC;
    return kvck_x86_has_avx512() ? KVCK_ISA_AVX512 : KVCK_ISA_AVX2;
#else
    return KVCK_ISA_GENERIC;
#endif
}

static int env_cap(void)
{
    const char *e = getenv("KVCK_ISA");
    if (e && strcmp(e, "generic") == 0)
        return KVCK_ISA_GENERIC;
    if (e && strcmp(e, "avx2") == 0)
        return KVCK_ISA_AVX2;
    return KVCK_ISA_AVX512;
}

/* -1 until first use; racing first calls store the same value. */
static _Atomic int g_isa = -1;

static int start_isa(void)
{
    const int c = cpu_isa(), e = env_cap();
    return c < e ? c : e;
}

int kvck_isa(void)
{
    int v = g_isa;
    if (v < 0)
        g_isa = v = start_isa();
    return v;
}

int kvck_isa_set(int isa)
{
    const int c = cpu_isa();
    int v = isa < 0 ? start_isa() : isa < c ? isa : c;
    g_isa = v;
    return v;
}

const char *kvck_isa_name(int isa)
{
    switch (isa) {
    case KVCK_ISA_GENERIC: return "generic";
    case KVCK_ISA_AVX2: return "avx2";
    case KVCK_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}
