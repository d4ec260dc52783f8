/*
 * broken.c -- kvc-full.so with exactly one defect, to prove kvc-conform
 * catches it. Linked with full's own sources, compiled with
 * -Dkvc_plugin_entry=kvc_full_entry_real so full's entry is renamed (and
 * hidden: declared hidden here, local in the version script), and with one
 * of the BROKEN_* macros selecting the defect:
 *
 *   BROKEN_CRASH        attend writes through NULL (SIGSEGV) after full's attend
 *   BROKEN_LEAK         seq_open allocates 4096 extra bytes through the host
 *                       allocator and nothing ever frees them
 *   BROKEN_UNDERREPORT  seq_stats reports half the payload, and a resident total
 *                       (still the sum of its parts) lower than what is held
 *   BROKEN_NOTRUNCATE   truncate returns KVC_OK and does nothing
 *   BROKEN_NAN          attend writes a NaN into its output's first element
 *   BROKEN_EXPORT2      exports a second symbol, kvc_broken_extra
 *   BROKEN_HANG         attend never returns (sleeps in pause() forever)
 *
 * Everything else is full's code, called through full's own descriptor: the
 * entry returns a copy of it with id "broken-<defect>" and one function
 * pointer replaced by a wrapper.
 */
#undef kvc_plugin_entry

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "kvc.h"

#if defined(BROKEN_CRASH)
#define BROKEN_ID "broken-crash"
#define BROKEN_WHAT "attend segfaults"
#elif defined(BROKEN_LEAK)
#define BROKEN_ID "broken-leak"
#define BROKEN_WHAT "every sequence leaks 4096 host bytes"
#elif defined(BROKEN_UNDERREPORT)
#define BROKEN_ID "broken-underreport"
#define BROKEN_WHAT "seq_stats under-reports resident bytes"
#elif defined(BROKEN_NOTRUNCATE)
#define BROKEN_ID "broken-notruncate"
#define BROKEN_WHAT "truncate does nothing"
#elif defined(BROKEN_NAN)
#define BROKEN_ID "broken-nan"
#define BROKEN_WHAT "attend writes a NaN"
#elif defined(BROKEN_EXPORT2)
#define BROKEN_ID "broken-export2"
#define BROKEN_WHAT "a second exported symbol"
#elif defined(BROKEN_HANG)
#define BROKEN_ID "broken-hang"
#define BROKEN_WHAT "attend hangs"
#else
#error "define one BROKEN_<DEFECT>"
#endif

/* full.c's kvc_plugin_entry, renamed on the command line. Hidden: the ELF
 * linker keeps the most constraining visibility of all declarations. */
__attribute__((visibility("hidden"))) const kvc_plugin *kvc_full_entry_real(uint32_t v);

static const kvc_plugin *full; /* full's own descriptor */
static kvc_plugin broken;      /* the copy handed out */

#if defined(BROKEN_CRASH) || defined(BROKEN_NAN) || defined(BROKEN_HANG)
static kvc_status broken_attend(kvc_seq *seq, uint32_t layer, uint32_t n_q,
                                const int32_t *positions, const void *q_pre, void *out)
{
    kvc_status st = full->attend(seq, layer, n_q, positions, q_pre, out);
#if defined(BROKEN_CRASH)
    if (st == KVC_OK) {
        /* Volatile both ways: a real store to address 0 (SIGSEGV), which the
         * compiler may neither drop nor turn into a trap instruction. */
        volatile int *volatile nowhere = NULL;
        *nowhere = 1;
    }
#elif defined(BROKEN_NAN)
    if (st == KVC_OK && n_q > 0)
        ((float *)out)[0] = NAN;
#else
    if (st == KVC_OK)
        for (;;)
            pause();
#endif
    return st;
}
#endif

#if defined(BROKEN_LEAK)
/* The host of the last create(): one instance per test child is all this
 * fixture needs. */
static kvc_host leak_host;

static kvc_status broken_create(const kvc_create_info *info, kvc_instance **out, char *msg,
                                size_t msg_size)
{
    kvc_status st = full->create(info, out, msg, msg_size);
    if (st == KVC_OK)
        leak_host = *info->host;
    return st;
}

static kvc_status broken_seq_open(kvc_instance *inst, kvc_seq **out)
{
    kvc_status st = full->seq_open(inst, out);
    if (st == KVC_OK && leak_host.alloc)
        (void)leak_host.alloc(leak_host.user_data, 4096, 64, KVC_MEM_HOST, KVC_USAGE_CACHE);
    return st;
}
#endif

#if defined(BROKEN_UNDERREPORT)
static kvc_status broken_seq_stats(const kvc_seq *seq, kvc_seq_stats *out)
{
    kvc_status st = full->seq_stats(seq, out);
    if (st == KVC_OK && KVC_HAS_FIELD(out, kvc_seq_stats, bytes_resident)) {
        out->bytes_payload /= 2;
        out->bytes_resident =
            out->bytes_payload + out->bytes_metadata + out->bytes_reserved + out->bytes_fixed;
    }
    return st;
}
#endif

#if defined(BROKEN_NOTRUNCATE)
static kvc_status broken_truncate(kvc_seq *seq, int32_t position)
{
    if (!seq)
        return full->truncate(seq, position); /* still refuses NULL */
    return KVC_OK;
}
#endif

#if defined(BROKEN_EXPORT2)
KVC_EXPORT int kvc_broken_extra(void);
KVC_EXPORT int kvc_broken_extra(void)
{
    return 42;
}
#endif

static void init(void)
{
    full = kvc_full_entry_real(KVC_ABI_VERSION);
    if (!full)
        return;
    broken = *full;
    broken.id = BROKEN_ID;
    broken.name = "kvc-full with one defect: " BROKEN_WHAT;
    broken.description = "A test fixture of kvc-conform: kvc-full.so with one deliberate "
                         "defect (" BROKEN_WHAT "). Never use it.";
#if defined(BROKEN_CRASH) || defined(BROKEN_NAN) || defined(BROKEN_HANG)
    broken.attend = broken_attend;
#elif defined(BROKEN_LEAK)
    broken.create = broken_create;
    broken.seq_open = broken_seq_open;
#elif defined(BROKEN_UNDERREPORT)
    broken.seq_stats = broken_seq_stats;
#elif defined(BROKEN_NOTRUNCATE)
    broken.truncate = broken_truncate;
#endif
}

KVC_EXPORT const kvc_plugin *kvc_plugin_entry(uint32_t host_abi_version)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (KVC_VERSION_MAJOR(host_abi_version) != KVC_ABI_VERSION_MAJOR)
        return NULL;
    pthread_once(&once, init);
    return full ? &broken : NULL;
}
