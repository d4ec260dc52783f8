/*
 * host_example.c -- the smallest server-side integration of a kvc plugin:
 * only <kvc.h> and dlopen, no kvc library. Loads a plugin .so, creates an
 * instance for a model's attention shape, prefills a prompt and decodes a
 * few tokens on one layer, and prints what the cache holds.
 *
 *   cc $(pkg-config --cflags kvc) host_example.c -ldl -lm -o host_example
 *   ./host_example "$(pkg-config --variable=plugindir kvc)/kvc-full.so"
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvc.h>

/* Host services: a server would route these to its own pools and logger. */
static void *host_alloc(void *ud, size_t size, size_t align, int32_t kind, int32_t usage)
{
    (void)ud, (void)usage;
    if (kind != KVC_MEM_HOST)
        return NULL;
    return aligned_alloc(align, (size + align - 1) / align * align); /* C11 */
}
static void host_free(void *ud, void *p, size_t size, int32_t kind)
{
    (void)ud, (void)size, (void)kind;
    free(p);
}
static void host_log(void *ud, int32_t level, const char *msg)
{
    (void)ud;
    fprintf(stderr, "plugin log [%d]: %s\n", (int)level, msg);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s PLUGIN.so\n", argv[0]);
        return 2;
    }
    void *so = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!so) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    kvc_plugin_entry_fn entry = (kvc_plugin_entry_fn)dlsym(so, KVC_PLUGIN_ENTRY_SYMBOL);
    const kvc_plugin *p = entry ? entry(KVC_ABI_VERSION) : NULL;
    if (!p) {
        fprintf(stderr, "%s is not a kvc %d.x plugin\n", argv[1], KVC_ABI_VERSION_MAJOR);
        return 1;
    }

    kvc_host host = {sizeof host, 0, NULL, host_alloc, host_free, host_log, NULL};
    /* SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads of 64, RoPE 1e5. */
    kvc_geometry geo = {0};
    geo.struct_size = sizeof geo;
    geo.n_layers = 30, geo.n_heads = 9, geo.n_kv_heads = 3, geo.head_dim = 64;
    geo.hidden_size = 576, geo.max_positions = 8192;
    geo.rope_style = KVC_ROPE_ADJACENT, geo.rope_theta = 100000.0f;
    kvc_create_info ci = {0};
    ci.struct_size = sizeof ci;
    ci.host = &host, ci.geometry = &geo;
    ci.device = KVC_MEM_HOST, ci.dtype = KVC_DTYPE_F32;

    char msg[256];
    kvc_instance *inst;
    if (p->create(&ci, &inst, msg, sizeof msg) != KVC_OK) {
        fprintf(stderr, "create: %s\n", msg);
        return 1;
    }
    kvc_seq *seq;
    if (p->seq_open(inst, &seq) != KVC_OK)
        return 1;

    enum { PROMPT = 100, DECODE = 8, KW = 3 * 64, QW = 9 * 64 };
    static float k[PROMPT + DECODE][KW], v[PROMPT + DECODE][KW], q[PROMPT + DECODE][QW];
    static float out[PROMPT][QW];
    int32_t pos[PROMPT + DECODE];
    for (int t = 0; t < PROMPT + DECODE; t++) {
        pos[t] = t;
        for (int i = 0; i < KW; i++)
            k[t][i] = sinf(0.1f * (float)(t + i)), v[t][i] = cosf(0.07f * (float)(t * i));
        for (int i = 0; i < QW; i++)
            q[t][i] = sinf(0.05f * (float)(t - i));
    }
    /* Prefill layer 0 with the prompt, then decode one token at a time. */
    if (p->append(seq, 0, PROMPT, pos, k, v, NULL) ||
        p->attend(seq, 0, PROMPT, pos, q, out)) {
        fprintf(stderr, "prefill: %s\n", p->seq_message(seq));
        return 1;
    }
    for (int t = PROMPT; t < PROMPT + DECODE; t++)
        if (p->append(seq, 0, 1, &pos[t], k[t], v[t], NULL) ||
            p->attend(seq, 0, 1, &pos[t], q[t], out[0])) {
            fprintf(stderr, "decode: %s\n", p->seq_message(seq));
            return 1;
        }
    for (int i = 0; i < QW; i++)
        if (!isfinite(out[0][i]))
            return 1;
    kvc_seq_stats st = {0};
    st.struct_size = sizeof st;
    p->seq_stats(seq, &st);
    printf("%s %s: %llu tokens held, %llu bytes resident, out[0] = %.6f\n", p->id, p->version,
           (unsigned long long)st.tokens_appended, (unsigned long long)st.bytes_resident,
           (double)out[0][0]);
    p->seq_close(seq);
    p->destroy(inst);
    dlclose(so);
    return 0;
}
