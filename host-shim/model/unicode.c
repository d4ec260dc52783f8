/* unicode.c -- UTF-8 code points, GPT-2's byte alphabet and the
 * pre-tokenizers (see unicode.h).
 *
 * The byte map is computed in closed form rather than from a table built at
 * first use: nothing to initialise, so nothing to race on. */
#include "errmsg.h"
#include "unicode.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint32_t kvch_utf8_decode(const unsigned char *s, size_t len, size_t *adv)
{
    *adv = 1;
    unsigned char c = s[0];
    if (c < 0x80)
        return c;
    size_t need;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) { /* 0xC0/0xC1 could only start overlong forms */
        need = 1;
        cp = c & 0x1Fu;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        cp = c & 0x0Fu;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        cp = c & 0x07u;
        min = 0x10000;
    } else {
        return KVCH_UTF8_INVALID; /* a continuation byte, 0xC0/0xC1, 0xF5..0xFF */
    }
    if (len < need + 1)
        return KVCH_UTF8_INVALID;
    for (size_t i = 1; i <= need; i++) {
        if ((s[i] & 0xC0u) != 0x80u)
            return KVCH_UTF8_INVALID;
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return KVCH_UTF8_INVALID;
    *adv = need + 1;
    return cp;
}

size_t kvch_utf8_encode(uint32_t cp, unsigned char out[4])
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp <= 0x10FFFF) {
        out[0] = (unsigned char)(0xF0 | (cp >> 18));
        out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (unsigned char)(0x80 | (cp & 0x3F));
        return 4;
    }
    return 0;
}

/* The 68 bytes GPT-2 remaps, in order: 0x00..0x20 (33), 0x7F..0xA0 (34),
 * 0xAD (1). The n-th of them becomes U+0100 + n. */
uint32_t kvch_gpt2_byte_to_cp(uint8_t b)
{
    if (b <= 0x20)
        return 0x100u + b;
    if (b >= 0x7F && b <= 0xA0)
        return 0x100u + 33u + (uint32_t)(b - 0x7F);
    if (b == 0xAD)
        return 0x143u;
    return b;
}

int kvch_gpt2_cp_to_byte(uint32_t cp)
{
    if (cp < 0x100) {
        if (cp <= 0x20 || (cp >= 0x7F && cp <= 0xA0) || cp == 0xAD)
            return -1; /* remapped bytes never stand for themselves */
        return (int)cp;
    }
    if (cp <= 0x120)
        return (int)(cp - 0x100);
    if (cp <= 0x142)
        return (int)(cp - 0x100 - 33 + 0x7F);
    if (cp == 0x143)
        return 0xAD;
    return -1;
}

size_t kvch_gpt2_encode(const unsigned char *in, size_t n, unsigned char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = kvch_gpt2_byte_to_cp(in[i]);
        if (cp < 0x80) {
            out[o++] = (unsigned char)cp;
        } else { /* cp < 0x144: two bytes */
            out[o++] = (unsigned char)(0xC0 | (cp >> 6));
            out[o++] = (unsigned char)(0x80 | (cp & 0x3F));
        }
    }
    return o;
}

size_t kvch_gpt2_decode(const unsigned char *s, size_t n, unsigned char *out)
{
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        size_t adv;
        uint32_t cp = kvch_utf8_decode(s + i, n - i, &adv);
        int b = cp == KVCH_UTF8_INVALID ? -1 : kvch_gpt2_cp_to_byte(cp);
        if (b >= 0) {
            out[k++] = (unsigned char)b;
        } else {
            memcpy(out + k, s + i, adv);
            k += adv;
        }
        i += adv;
    }
    return k;
}

/* ---- pre-tokenizers ---------------------------------------------------- */

#define MAX_REGEX 4

/* The regex lists, verbatim from llama.cpp's llm_tokenizer_bpe constructor
 * (src/llama-vocab.cpp), and the tokenizer.ggml.pre names that select them
 * (llama_vocab::impl::load). */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define RE_CONTRACTIONS "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_LLAMA3 RE_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN2 RE_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

typedef struct pre_kind {
    const char *names; /* space-separated tokenizer.ggml.pre values */
    int ignore_merges;
    const char *re[MAX_REGEX];
} pre_kind;

static const pre_kind pre_kinds[] = {
    {"default", 0,
     {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}},
    /* "gpt2" is not a llama.cpp name ("gpt-2" is); accepted as an alias. */
    {"gpt-2 gpt2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum "
     "modern-bert mpt olmo jais exaone4 trillion granite-docling",
     0, {RE_GPT2}},
    /* digits one by one, then GPT-2's pattern */
    {"smollm starcoder refact command-r codeshell exaone minerva-7b mellum2", 0,
     {"\\p{N}", RE_GPT2}},
    {"llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", 1,
     {RE_LLAMA3}},
    {"dbrx smaug-bpe", 0, {RE_LLAMA3}},
    {"qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", 0,
     {RE_QWEN2}},
    {"falcon", 0, {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}},
};

struct kvch_pretok {
    int n_re;
    pcre2_code *re[MAX_REGEX];
    pcre2_general_context *gctx;
    void *(*alloc)(size_t);
};


static const pre_kind *find_pre(const char *name, size_t len)
{
    for (size_t k = 0; k < sizeof pre_kinds / sizeof pre_kinds[0]; k++) {
        const char *s = pre_kinds[k].names;
        while (*s) {
            size_t w = strcspn(s, " ");
            if (w == len && memcmp(s, name, len) == 0)
                return &pre_kinds[k];
            s += w;
            s += strspn(s, " ");
        }
    }
    return NULL;
}

/* Unicode White_Space, as a class body: llama.cpp's whitespace set. */
#define WS_CLASS "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}" \
    "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

/* Rewrites \s (and \S outside a class) to WS_CLASS. Only escapes and class
 * brackets are tracked: enough for the fixed patterns above. NULL on OOM. */
static char *rewrite_ws(const char *p, void *(*alloc)(size_t))
{
    size_t n = strlen(p), cap = n * (sizeof WS_CLASS + 3) + 1;
    char *o = alloc(cap);
    if (o == NULL)
        return NULL;
    size_t k = 0;
    int inside = 0;
    for (size_t i = 0; i < n;) {
        if (p[i] == '\\' && i + 1 < n) {
            const char *rep = NULL;
            if (p[i + 1] == 's')
                rep = inside ? WS_CLASS : "[" WS_CLASS "]";
            else if (p[i + 1] == 'S' && !inside)
                rep = "[^" WS_CLASS "]";
            if (rep) {
                memcpy(o + k, rep, strlen(rep));
                k += strlen(rep);
            } else {
                o[k++] = p[i];
                o[k++] = p[i + 1];
            }
            i += 2;
            continue;
        }
        if (p[i] == '[' && !inside) {
            inside = 1;
            o[k++] = p[i++];
            if (i < n && p[i] == '^')
                o[k++] = p[i++];
            if (i < n && p[i] == ']') /* a leading ']' is literal */
                o[k++] = p[i++];
            continue;
        }
        if (p[i] == ']' && inside)
            inside = 0;
        o[k++] = p[i++];
    }
    o[k] = '\0';
    return o;
}

static void *pcre_malloc(PCRE2_SIZE n, void *data)
{
    const kvch_pretok *p = data;
    return p->alloc(n);
}

static void pcre_free(void *ptr, void *data)
{
    (void)data;
    free(ptr);
}

static void *plain_malloc(size_t n)
{
    return malloc(n);
}

void kvch_pretok_free(kvch_pretok *p)
{
    if (p == NULL)
        return;
    for (int i = 0; i < p->n_re; i++)
        pcre2_code_free(p->re[i]);
    pcre2_general_context_free(p->gctx);
    free(p);
}

kvc_status kvch_pretok_create(const char *name, size_t len, void *(*alloc)(size_t),
                              kvch_pretok **out, int *ignore_merges, char *err,
                              size_t err_size)
{
    const pre_kind *pk = find_pre(name, len);
    if (pk == NULL) {
        kvch_set_err(err, err_size, "tokenizer.ggml.pre \"%.*s\" is not a known pre-tokenizer",
                (int)len, name);
        return KVC_E_UNSUPPORTED;
    }
    if (alloc == NULL)
        alloc = plain_malloc;
    kvch_pretok *p = alloc(sizeof *p);
    if (p == NULL) {
        kvch_set_err(err, err_size, "out of memory compiling the pre-tokenizer");
        return KVC_E_NOMEM;
    }
    memset(p, 0, sizeof *p);
    p->alloc = alloc;
    p->gctx = pcre2_general_context_create(pcre_malloc, pcre_free, p);
    pcre2_compile_context *cctx = p->gctx ? pcre2_compile_context_create(p->gctx) : NULL;
    kvc_status st = cctx ? KVC_OK : KVC_E_NOMEM;
    if (st != KVC_OK)
        kvch_set_err(err, err_size, "out of memory compiling the pre-tokenizer");
    for (int i = 0; i < MAX_REGEX && pk->re[i] && st == KVC_OK; i++) {
        char *pat = rewrite_ws(pk->re[i], alloc);
        if (pat == NULL) {
            kvch_set_err(err, err_size, "out of memory compiling the pre-tokenizer");
            st = KVC_E_NOMEM;
            break;
        }
        int ec;
        PCRE2_SIZE eo;
        p->re[i] = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo,
                                 cctx);
        free(pat);
        if (p->re[i] == NULL) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(ec, msg, sizeof msg);
            kvch_set_err(err, err_size, "pre-tokenizer regex %d (%s) does not compile: %s at %zu",
                    i, pk->re[i], (const char *)msg, (size_t)eo);
            st = ec == PCRE2_ERROR_HEAP_FAILED ? KVC_E_NOMEM : KVC_E_INTERNAL;
            break;
        }
        /* Without JIT (unsupported CPU, no executable memory) the
         * interpreter gives the same matches, only slower. */
        (void)pcre2_jit_compile(p->re[i], PCRE2_JIT_COMPLETE);
        p->n_re = i + 1;
    }
    pcre2_compile_context_free(cctx);
    if (st != KVC_OK) {
        kvch_pretok_free(p);
        return st;
    }
    *ignore_merges = pk->ignore_merges;
    *out = p;
    return KVC_OK;
}

/* One split: the regexes' match state, for one thread. */
typedef struct run {
    const kvch_pretok *p;
    const char *text;
    kvch_pretok_sink sink;
    void *ctx;
    pcre2_match_data *md;
    pcre2_match_context *mctx; /* only once the JIT's default stack was too small */
    pcre2_jit_stack *jit_stack;
} run;

static int run_match(run *r, const pcre2_code *re, const char *subj, size_t len, size_t start)
{
    int rc = pcre2_match(re, (PCRE2_SPTR)subj, len, start, 0, r->md, r->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && r->mctx == NULL) {
        /* A very long run outgrew the JIT's 32 KiB default stack (our
         * patterns have not been seen to): give this split a bigger one. */
        r->mctx = pcre2_match_context_create(r->p->gctx);
        r->jit_stack = pcre2_jit_stack_create(64 * 1024, 256 * 1024 * 1024, r->p->gctx);
        if (r->mctx == NULL || r->jit_stack == NULL)
            return PCRE2_ERROR_NOMEMORY;
        pcre2_jit_stack_assign(r->mctx, NULL, r->jit_stack);
        rc = pcre2_match(re, (PCRE2_SPTR)subj, len, start, 0, r->md, r->mctx);
    }
    return rc;
}

/* Splits text[off, off + len) by regex `level`, handing every matched and
 * unmatched span to the next level; past the last regex, to the sink. */
static kvc_status split_level(run *r, int level, size_t off, size_t len)
{
    if (level == r->p->n_re)
        return r->sink(r->ctx, off, len);
    const char *subj = r->text + off;
    size_t pos = 0;
    kvc_status st = KVC_OK;
    while (pos < len && st == KVC_OK) {
        int rc = run_match(r, r->p->re[level], subj, len, pos);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return rc == PCRE2_ERROR_NOMEMORY || rc == PCRE2_ERROR_HEAPLIMIT ? KVC_E_NOMEM
                                                                             : KVC_E_INTERNAL;
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(r->md);
        size_t ms = ov[0], me = ov[1];
        if (me <= ms || ms < pos)
            break; /* no pattern here matches empty; keep the rest whole if one did */
        if (ms > pos)
            st = split_level(r, level + 1, off + pos, ms - pos);
        if (st == KVC_OK)
            st = split_level(r, level + 1, off + ms, me - ms);
        pos = me;
    }
    if (st == KVC_OK && pos < len)
        st = split_level(r, level + 1, off + pos, len - pos);
    return st;
}

kvc_status kvch_pretok_split(const kvch_pretok *p, const char *text, size_t len,
                             kvch_pretok_sink sink, void *ctx)
{
    if (len == 0)
        return KVC_OK;
    run r = {.p = p, .text = text, .sink = sink, .ctx = ctx};
    /* one ovector pair: the whole match is all we read */
    r.md = pcre2_match_data_create(1, p->gctx);
    if (r.md == NULL)
        return KVC_E_NOMEM;
    kvc_status st = split_level(&r, 0, 0, len);
    pcre2_match_data_free(r.md);
    pcre2_match_context_free(r.mctx);
    pcre2_jit_stack_free(r.jit_stack);
    return st;
}
