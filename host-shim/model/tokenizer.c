/* tokenizer.c -- byte-level BPE from a GGUF vocabulary (see tokenizer.h).
 *
 * Follows llama.cpp's tokenizer (src/llama-vocab.cpp, src/unicode.cpp) so
 * that the same text gives the same ids:
 *   1. special tokens written in the text are cut out first, longest token
 *      text first (llama.cpp's tokenizer_st_partition);
 *   2. each remaining span is split by the pre-tokenizer's regex list, each
 *      regex splitting the pieces of the previous one, matched and unmatched
 *      spans both kept (unicode_regex_split; kvch_pretok_* in unicode.c);
 *   3. each piece is BPE'd: one symbol per byte, then the adjacent pair of
 *      lowest merge rank (leftmost on ties) is merged until none applies;
 *      a symbol that is not a token falls back to its byte tokens.
 * Where we differ, on purpose: invalid UTF-8 is kept as its bytes (llama.cpp
 * turns each invalid byte into U+FFFD), so decode(encode(s)) == s for any
 * bytes that have tokens (a byte with none is dropped, by both); and `\s`
 * means exactly Unicode White_Space, llama.cpp's set (PCRE2's own \s also
 * takes U+180E): unicode.c rewrites the patterns before compiling them.
 *
 * Inside, BPE works on token ids, not strings: every merge's two sides are
 * checked to be tokens at load time, so a merge is a pair of ids -> (rank,
 * id of the merged text or -1), found in one open-addressing hash. */
#include "errmsg.h"
#include "tokenizer.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode.h"

/* token_type values of GGUF (llama.cpp's llama_token_type). */
enum {
    TT_UNDEFINED = 0, TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3,
    TT_USER_DEFINED = 4, TT_UNUSED = 5, TT_BYTE = 6
};

typedef struct merge_slot {
    uint64_t key;   /* left id << 32 | right id; EMPTY_KEY when free */
    int32_t rank;   /* index in tokenizer.ggml.merges */
    int32_t result; /* id of left+right, or -1 when that text is no token */
} merge_slot;
#define EMPTY_KEY UINT64_MAX

/* A string -> id hash: the string's hash kept in the slot so that most
 * mismatches cost no visit to the string itself. */
typedef struct map_slot {
    uint32_t hash;
    int32_t id1; /* id + 1; 0 = free */
} map_slot;

typedef struct str_map {
    map_slot *slot;
    uint32_t mask;
} str_map;

typedef struct special_tok {
    int32_t id;
    uint32_t len;
    uint8_t type;
} special_tok;

struct kvch_tokenizer {
    int32_t n_vocab;
    char *text;          /* the vocabulary's spelling of every token, NUL after each */
    uint32_t *text_off;  /* [n_vocab + 1] into text */
    char *piece;         /* decoded bytes of every token */
    uint32_t *piece_off; /* [n_vocab + 1] into piece */
    uint8_t *type;       /* [n_vocab] TT_* */
    uint8_t *flags;      /* [n_vocab] KVC_TOKEN_* */
    str_map tmap;        /* spelling -> id */
    str_map pmap;        /* decoded bytes -> id, normal tokens only */
    /* [n_vocab] memo: does BPE of the token's own bytes give back just that
     * token? 0 not known yet, 1 yes, 2 no. Filled in as pieces are met, so
     * that a frequent word costs one lookup instead of a BPE: the one thing
     * written after creation; concurrent writers store the same value. */
    _Atomic uint8_t *memo;
    merge_slot *mmap;
    uint32_t mmap_mask;
    int32_t byte_tok[256]; /* the token of each single byte, -1 if none */
    special_tok *special;  /* longest text first */
    uint32_t n_special;
    int32_t bos, eos;
    int ignore_merges; /* a piece that is a whole token skips BPE (llama3) */
    kvch_pretok *pretok;
};

/* ---- allocation, with a failure hook for tests ------------------------- */

static _Atomic uint64_t fail_countdown; /* 0: off; else the n-th call fails */

static int alloc_should_fail(void)
{
    uint64_t c = atomic_load(&fail_countdown);
    while (c != 0) {
        if (atomic_compare_exchange_weak(&fail_countdown, &c, c - 1))
            return c == 1;
    }
    return 0;
}

void kvch_tok_debug_fail_alloc(uint64_t n)
{
    atomic_store(&fail_countdown, n);
}

static void *tmalloc(size_t n)
{
    return alloc_should_fail() ? NULL : malloc(n ? n : 1);
}

/* Grows the array whose pointer is at `pp` (any object pointer type) to
 * hold at least `need` elements of `size` bytes, doubling. The pointer is
 * moved with memcpy so that no pointer is written through a void ** (which
 * strict aliasing forbids). On failure the old array stays valid. */
static int grow(void *pp, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    if (c > SIZE_MAX / size || alloc_should_fail())
        return -1;
    void *p;
    memcpy(&p, pp, sizeof p);
    void *q = realloc(p, c * size);
    if (q == NULL)
        return -1;
    memcpy(pp, &q, sizeof q);
    *cap = c;
    return 0;
}


/* ---- hashing ----------------------------------------------------------- */

static uint32_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = UINT64_C(0xcbf29ce484222325); /* FNV-1a, then a final mix */
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * UINT64_C(0x100000001b3);
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    return (uint32_t)h;
}

static uint32_t hash_pair(uint64_t key)
{
    key *= UINT64_C(0x9E3779B97F4A7C15);
    return (uint32_t)(key >> 32);
}

static uint32_t pow2_at_least(uint64_t n)
{
    uint32_t c = 16;
    while (c < n && c < (UINT32_C(1) << 31))
        c *= 2;
    return c;
}

/* The id whose string in `arena` (at off[id], off[id + 1] - off[id] - gap
 * bytes: gap 1 where a NUL follows each) is s[0..n), or -1. */
static int32_t map_find(const str_map *m, const char *arena, const uint32_t *off, uint32_t gap,
                        const void *s, size_t n)
{
    uint32_t h = hash_bytes(s, n);
    for (uint32_t i = h & m->mask;; i = (i + 1) & m->mask) {
        const map_slot *sl = &m->slot[i];
        if (sl->id1 == 0)
            return -1;
        int32_t id = sl->id1 - 1;
        if (sl->hash == h && off[id + 1] - off[id] - gap == n &&
            memcmp(arena + off[id], s, n) == 0)
            return id;
    }
}

static void map_insert(str_map *m, const void *s, size_t n, int32_t id)
{
    uint32_t h = hash_bytes(s, n), i = h & m->mask;
    while (m->slot[i].id1 != 0)
        i = (i + 1) & m->mask;
    m->slot[i] = (map_slot){h, id + 1};
}

static int32_t lookup_text(const kvch_tokenizer *t, const void *s, size_t n)
{
    return map_find(&t->tmap, t->text, t->text_off, 1, s, n);
}

static int32_t lookup_piece(const kvch_tokenizer *t, const void *s, size_t n)
{
    return map_find(&t->pmap, t->piece, t->piece_off, 0, s, n);
}

static const merge_slot *lookup_merge(const kvch_tokenizer *t, int32_t a, int32_t b)
{
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (uint32_t i = hash_pair(key) & t->mmap_mask;; i = (i + 1) & t->mmap_mask) {
        if (t->mmap[i].key == key)
            return &t->mmap[i];
        if (t->mmap[i].key == EMPTY_KEY)
            return NULL;
    }
}

/* ---- loading ----------------------------------------------------------- */

void kvch_tok_free(kvch_tokenizer *t)
{
    if (t == NULL)
        return;
    kvch_pretok_free(t->pretok);
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->pmap.slot);
    free((void *)t->memo);
    free(t->type);
    free(t->flags);
    free(t->tmap.slot);
    free(t->mmap);
    free(t->special);
    free(t);
}

#define KEY_MODEL "tokenizer.ggml.model"
#define KEY_PRE "tokenizer.ggml.pre"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_TYPES "tokenizer.ggml.token_type"
#define KEY_MERGES "tokenizer.ggml.merges"

static kvc_status load_tokens(kvch_tokenizer *t, const kvch_gguf *g, char *err, size_t err_size)
{
    int et;
    uint64_t n;
    if (kvch_gguf_get_arr(g, KEY_TOKENS, &et, &n) != 0 || et != KVCH_GGUF_STRING || n == 0) {
        kvch_set_err(err, err_size, "%s is missing, empty or not a string array", KEY_TOKENS);
        return KVC_E_CORRUPT;
    }
    if (n > INT32_MAX) {
        kvch_set_err(err, err_size, "%s has %llu tokens (at most %d)", KEY_TOKENS,
                (unsigned long long)n, INT32_MAX);
        return KVC_E_UNSUPPORTED;
    }
    t->n_vocab = (int32_t)n;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        size_t len;
        if (kvch_gguf_arr_str(g, KEY_TOKENS, i, &len) == NULL) {
            kvch_set_err(err, err_size, "%s[%llu] cannot be read", KEY_TOKENS, (unsigned long long)i);
            return KVC_E_CORRUPT;
        }
        total += len + 1;
    }
    if (total > UINT32_MAX) {
        kvch_set_err(err, err_size, "%s holds %llu bytes of text (at most 4 GiB)", KEY_TOKENS,
                (unsigned long long)total);
        return KVC_E_UNSUPPORTED;
    }
    t->text = tmalloc(total);
    t->piece = tmalloc(total); /* a decoded token is never longer than its spelling */
    t->text_off = tmalloc((n + 1) * sizeof *t->text_off);
    t->piece_off = tmalloc((n + 1) * sizeof *t->piece_off);
    t->memo = tmalloc(n);
    t->type = tmalloc(n);
    t->flags = tmalloc(n);
    uint32_t slots = pow2_at_least(2 * n);
    t->tmap.slot = tmalloc((size_t)slots * sizeof *t->tmap.slot);
    t->pmap.slot = tmalloc((size_t)slots * sizeof *t->pmap.slot);
    if (!t->text || !t->piece || !t->text_off || !t->piece_off || !t->memo || !t->type ||
        !t->flags || !t->tmap.slot || !t->pmap.slot) {
        kvch_set_err(err, err_size, "out of memory for a vocabulary of %llu tokens",
                (unsigned long long)n);
        return KVC_E_NOMEM;
    }
    memset(t->tmap.slot, 0, (size_t)slots * sizeof *t->tmap.slot);
    memset(t->pmap.slot, 0, (size_t)slots * sizeof *t->pmap.slot);
    for (uint64_t i = 0; i < n; i++)
        atomic_init(&t->memo[i], 0);
    t->tmap.mask = t->pmap.mask = slots - 1;

    uint64_t n_types = 0;
    int have_types = kvch_gguf_get_arr(g, KEY_TYPES, &et, &n_types) == 0;
    if (have_types && n_types < n) {
        kvch_set_err(err, err_size, "%s has %llu entries for %llu tokens", KEY_TYPES,
                (unsigned long long)n_types, (unsigned long long)n);
        return KVC_E_CORRUPT;
    }

    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        size_t len;
        const char *s = kvch_gguf_arr_str(g, KEY_TOKENS, i, &len);
        t->text_off[i] = off;
        memcpy(t->text + off, s, len);
        t->text[off + len] = '\0';
        off += (uint32_t)len + 1;
        int64_t ty = TT_NORMAL; /* llama.cpp: no token_type array, all normal */
        if (have_types && kvch_gguf_arr_i64(g, KEY_TYPES, i, &ty) != 0) {
            kvch_set_err(err, err_size, "%s[%llu] is not an integer", KEY_TYPES,
                    (unsigned long long)i);
            return KVC_E_CORRUPT;
        }
        t->type[i] = ty >= TT_UNDEFINED && ty <= TT_BYTE ? (uint8_t)ty : TT_UNDEFINED;
    }
    t->text_off[n] = off;

    for (uint64_t i = 0; i < n; i++) {
        const char *s = t->text + t->text_off[i];
        size_t len = t->text_off[i + 1] - t->text_off[i] - 1;
        int32_t dup = lookup_text(t, s, len);
        if (dup >= 0) {
            kvch_set_err(err, err_size, "%s: \"%.*s\" is both token %d and token %llu", KEY_TOKENS,
                    (int)len, s, dup, (unsigned long long)i);
            return KVC_E_CORRUPT;
        }
        map_insert(&t->tmap, s, len, (int32_t)i);
    }
    return KVC_OK;
}

static kvc_status load_merges(kvch_tokenizer *t, const kvch_gguf *g, char *err, size_t err_size)
{
    int et;
    uint64_t n;
    if (kvch_gguf_get_arr(g, KEY_MERGES, &et, &n) != 0 || et != KVCH_GGUF_STRING) {
        kvch_set_err(err, err_size, "%s is missing or not a string array", KEY_MERGES);
        return KVC_E_CORRUPT;
    }
    if (n > INT32_MAX) {
        kvch_set_err(err, err_size, "%s has %llu entries (at most %d)", KEY_MERGES,
                (unsigned long long)n, INT32_MAX);
        return KVC_E_UNSUPPORTED;
    }
    uint32_t slots = pow2_at_least(2 * n);
    t->mmap = tmalloc((size_t)slots * sizeof *t->mmap);
    if (t->mmap == NULL) {
        kvch_set_err(err, err_size, "out of memory for %llu merges", (unsigned long long)n);
        return KVC_E_NOMEM;
    }
    for (uint32_t i = 0; i < slots; i++)
        t->mmap[i].key = EMPTY_KEY;
    t->mmap_mask = slots - 1;

    char *buf = NULL; /* left+right, to find the merged token */
    size_t buf_cap = 0;
    kvc_status st = KVC_OK;
    for (uint64_t i = 0; i < n && st == KVC_OK; i++) {
        size_t len;
        const char *m = kvch_gguf_arr_str(g, KEY_MERGES, i, &len);
        /* Split at the first space after the first byte, as llama.cpp does. */
        const char *sp = m && len > 1 ? memchr(m + 1, ' ', len - 1) : NULL;
        if (sp == NULL) {
            kvch_set_err(err, err_size, "%s[%llu] (\"%.*s\") is not \"left right\"", KEY_MERGES,
                    (unsigned long long)i, m ? (int)len : 0, m ? m : "");
            st = KVC_E_CORRUPT;
            break;
        }
        size_t la = (size_t)(sp - m), lb = len - la - 1;
        int32_t a = lookup_text(t, m, la), b = lookup_text(t, sp + 1, lb);
        if (a < 0 || b < 0) {
            kvch_set_err(err, err_size, "%s[%llu] (\"%.*s\") names an unknown token \"%.*s\"",
                    KEY_MERGES, (unsigned long long)i, (int)len, m, (int)(a < 0 ? la : lb),
                    a < 0 ? m : sp + 1);
            st = KVC_E_CORRUPT;
            break;
        }
        if (grow(&buf, &buf_cap, la + lb, 1) != 0) {
            kvch_set_err(err, err_size, "out of memory reading %s", KEY_MERGES);
            st = KVC_E_NOMEM;
            break;
        }
        memcpy(buf, m, la);
        memcpy(buf + la, sp + 1, lb);
        uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
        uint32_t j = hash_pair(key) & t->mmap_mask;
        while (t->mmap[j].key != EMPTY_KEY && t->mmap[j].key != key)
            j = (j + 1) & t->mmap_mask;
        if (t->mmap[j].key == EMPTY_KEY) { /* a repeated pair keeps its first rank */
            t->mmap[j].key = key;
            t->mmap[j].rank = (int32_t)i;
            t->mmap[j].result = lookup_text(t, buf, la + lb);
        }
    }
    free(buf);
    return st;
}

static int is_ascii_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

static int is_ascii_punct(unsigned char c)
{
    return (c >= '!' && c <= '/') || (c >= ':' && c <= '@') || (c >= '[' && c <= '`') ||
           (c >= '{' && c <= '~');
}

/* Decoded bytes and flags of every token, as llama.cpp's token_to_piece
 * with special = true: control, unknown and user-defined tokens are their
 * text; normal ones map back through GPT-2's alphabet (a character outside
 * it is kept as its UTF-8, where llama.cpp writes "[UNK_BYTE_..]"); byte
 * tokens "<0xXX>" are that byte; unused and undefined ones are empty. */
static void build_pieces(kvch_tokenizer *t)
{
    uint32_t o = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const unsigned char *s = (const unsigned char *)t->text + t->text_off[id];
        size_t len = t->text_off[id + 1] - t->text_off[id] - 1;
        unsigned char *d = (unsigned char *)t->piece + o;
        size_t k = 0;
        unsigned hx;
        switch (t->type[id]) {
        case TT_CONTROL:
        case TT_UNKNOWN:
        case TT_USER_DEFINED:
            memcpy(d, s, len);
            k = len;
            break;
        case TT_NORMAL:
            k = kvch_gpt2_decode(s, len, d);
            break;
        case TT_BYTE:
            if (len == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' &&
                sscanf((const char *)s + 3, "%2x", &hx) == 1) {
                d[k++] = (unsigned char)hx;
            } else {
                memcpy(d, s, len);
                k = len;
            }
            break;
        default:
            break;
        }
        t->piece_off[id] = o;
        o += (uint32_t)k;

        uint8_t f = 0;
        if (t->type[id] == TT_CONTROL || id == t->bos || id == t->eos) {
            f |= KVC_TOKEN_SPECIAL;
        } else if (k > 0) {
            int all = 1, punct = 0;
            for (size_t i = 0; i < k && all; i++) {
                punct |= is_ascii_punct(d[i]);
                all = is_ascii_punct(d[i]) || is_ascii_space(d[i]);
            }
            if (all && punct)
                f |= KVC_TOKEN_PUNCT;
        }
        t->flags[id] = f;
    }
    t->piece_off[t->n_vocab] = o;

    for (int32_t id = 0; id < t->n_vocab; id++) {
        size_t k = t->piece_off[id + 1] - t->piece_off[id];
        /* A piece two tokens decode to keeps the first: the memo check in
         * bpe() stays exact whichever is found. */
        if (t->type[id] != TT_NORMAL || k == 0 ||
            lookup_piece(t, t->piece + t->piece_off[id], k) >= 0)
            continue;
        map_insert(&t->pmap, t->piece + t->piece_off[id], k, id);
    }
}

static int cmp_special(const void *a, const void *b)
{
    const special_tok *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* llama.cpp's special-token cache: control, user-defined and unknown tokens
 * (non-empty), longest first. */
static kvc_status build_special(kvch_tokenizer *t, char *err, size_t err_size)
{
    uint32_t n = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        n += t->type[id] == TT_CONTROL || t->type[id] == TT_USER_DEFINED ||
             t->type[id] == TT_UNKNOWN;
    t->special = tmalloc((size_t)n * sizeof *t->special);
    if (t->special == NULL) {
        kvch_set_err(err, err_size, "out of memory for %u special tokens", n);
        return KVC_E_NOMEM;
    }
    for (int32_t id = 0; id < t->n_vocab; id++) {
        uint8_t ty = t->type[id];
        uint32_t len = t->text_off[id + 1] - t->text_off[id] - 1;
        if ((ty == TT_CONTROL || ty == TT_USER_DEFINED || ty == TT_UNKNOWN) && len > 0)
            t->special[t->n_special++] = (special_tok){id, len, ty};
    }
    qsort(t->special, t->n_special, sizeof *t->special, cmp_special);
    return KVC_OK;
}

static int32_t special_id(const kvch_gguf *g, const char *key, int32_t n_vocab)
{
    uint32_t v;
    if (kvch_gguf_get_u32(g, key, &v) != 0 || v >= (uint32_t)n_vocab)
        return -1;
    return (int32_t)v;
}

kvc_status kvch_tok_from_gguf(const kvch_gguf *g, kvch_tokenizer **out, char *err,
                              size_t err_size)
{
    if (g == NULL || out == NULL) {
        kvch_set_err(err, err_size, "kvch_tok_from_gguf: NULL argument");
        return KVC_E_INVALID;
    }
    size_t len;
    const char *model = kvch_gguf_get_str(g, KEY_MODEL, &len);
    if (model == NULL) {
        kvch_set_err(err, err_size, "%s is missing: the file carries no tokenizer", KEY_MODEL);
        return KVC_E_UNSUPPORTED;
    }
    if (len != 4 || memcmp(model, "gpt2", 4) != 0) {
        kvch_set_err(err, err_size,
                "%s is \"%.*s\": only \"gpt2\" (byte-level BPE) is supported%s", KEY_MODEL,
                (int)len, model,
                len == 5 && memcmp(model, "llama", 5) == 0 ? ", not SentencePiece" : "");
        return KVC_E_UNSUPPORTED;
    }
    /* llama.cpp: a BPE vocabulary without a pre name gets "default". */
    const char *pre = kvch_gguf_get_str(g, KEY_PRE, &len);
    if (pre == NULL) {
        pre = "default";
        len = strlen(pre);
    }
    kvch_tokenizer *t = tmalloc(sizeof *t);
    if (t == NULL) {
        kvch_set_err(err, err_size, "out of memory for the tokenizer");
        return KVC_E_NOMEM;
    }
    memset(t, 0, sizeof *t);
    /* PCRE2 allocates through tmalloc too, so the test hook reaches it. */
    kvc_status st = kvch_pretok_create(pre, len, tmalloc, &t->pretok, &t->ignore_merges, err,
                                       err_size);
    if (st == KVC_OK)
        st = load_tokens(t, g, err, err_size);
    if (st == KVC_OK)
        st = load_merges(t, g, err, err_size);
    if (st == KVC_OK) {
        t->bos = special_id(g, "tokenizer.ggml.bos_token_id", t->n_vocab);
        t->eos = special_id(g, "tokenizer.ggml.eos_token_id", t->n_vocab);
        unsigned char enc[2];
        for (int b = 0; b < 256; b++) {
            unsigned char byte = (unsigned char)b;
            t->byte_tok[b] = lookup_text(t, enc, kvch_gpt2_encode(&byte, 1, enc));
        }
        build_pieces(t);
        st = build_special(t, err, err_size);
    }
    if (st != KVC_OK) {
        kvch_tok_free(t);
        return st;
    }
    *out = t;
    return KVC_OK;
}

/* ---- encoding ---------------------------------------------------------- */

typedef struct sym {
    int32_t id;         /* token of the symbol's text, or -1 */
    int32_t prev, next; /* neighbours in the piece, -1 at the ends */
    uint32_t len;       /* bytes; 0 once merged into its left neighbour */
} sym;

typedef struct bigram {
    int32_t rank, left, right;
    uint32_t len;   /* left.len + right.len when queued: stale if either grew */
    int32_t result; /* the merged token, or -1 */
} bigram;

typedef struct frag {
    int32_t id; /* a special token, or -1 for text [off, off + len) */
    size_t off, len;
} frag;

typedef struct enc {
    const kvch_tokenizer *t;
    const unsigned char *text;
    int32_t *out;
    size_t n, cap;
    sym *syms;
    size_t syms_cap;
    bigram *heap;
    size_t heap_n, heap_cap;
    unsigned char *scratch;
    size_t scratch_cap;
    size_t frag_off; /* where the fragment being pre-tokenized starts */
} enc;

static int emit(enc *e, int32_t id)
{
    if (grow(&e->out, &e->cap, e->n + 1, sizeof *e->out) != 0)
        return -1;
    e->out[e->n++] = id;
    return 0;
}

/* Bytes with no token are dropped, as llama.cpp does: no token can carry
 * them (SmolLM2's vocabulary lacks 21 of the 256). */
static int emit_bytes(enc *e, const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (e->t->byte_tok[s[i]] >= 0 && emit(e, e->t->byte_tok[s[i]]) != 0)
            return -1;
    return 0;
}

static int bigram_less(const bigram *a, const bigram *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static int heap_push(enc *e, bigram b)
{
    if (grow(&e->heap, &e->heap_cap, e->heap_n + 1, sizeof *e->heap) != 0)
        return -1;
    size_t i = e->heap_n++;
    while (i > 0 && bigram_less(&b, &e->heap[(i - 1) / 2])) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = b;
    return 0;
}

static bigram heap_pop(enc *e)
{
    bigram top = e->heap[0], last = e->heap[--e->heap_n];
    size_t i = 0, n = e->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && bigram_less(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!bigram_less(&e->heap[c], &last))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n > 0)
        e->heap[i] = last;
    return top;
}

static int try_pair(enc *e, int32_t l, int32_t r)
{
    if (l < 0 || r < 0 || e->syms[l].id < 0 || e->syms[r].id < 0)
        return 0;
    const merge_slot *m = lookup_merge(e->t, e->syms[l].id, e->syms[r].id);
    if (m == NULL)
        return 0;
    return heap_push(e, (bigram){m->rank, l, r, e->syms[l].len + e->syms[r].len, m->result});
}

static kvc_status bpe(enc *e, size_t off, size_t len)
{
    const kvch_tokenizer *t = e->t;
    const unsigned char *s = e->text + off;
    if (len == 0)
        return KVC_OK;
    if (len == 1)
        return emit_bytes(e, s, 1) == 0 ? KVC_OK : KVC_E_NOMEM;
    if (t->ignore_merges) {
        if (grow(&e->scratch, &e->scratch_cap, 2 * len, 1) != 0)
            return KVC_E_NOMEM;
        int32_t id = lookup_text(t, e->scratch, kvch_gpt2_encode(s, len, e->scratch));
        if (id >= 0)
            return emit(e, id) == 0 ? KVC_OK : KVC_E_NOMEM;
    }
    int32_t whole = lookup_piece(t, s, len);
    uint8_t memo = whole >= 0 ? atomic_load_explicit(&t->memo[whole], memory_order_relaxed) : 0;
    if (memo == 1)
        return emit(e, whole) == 0 ? KVC_OK : KVC_E_NOMEM;
    size_t n0 = e->n;
    if (grow(&e->syms, &e->syms_cap, len, sizeof *e->syms) != 0)
        return KVC_E_NOMEM;
    for (size_t i = 0; i < len; i++)
        e->syms[i] = (sym){t->byte_tok[s[i]], (int32_t)i - 1,
                           i + 1 < len ? (int32_t)i + 1 : -1, 1};
    e->heap_n = 0;
    for (size_t i = 1; i < len; i++)
        if (try_pair(e, (int32_t)i - 1, (int32_t)i) != 0)
            return KVC_E_NOMEM;
    while (e->heap_n > 0) {
        bigram b = heap_pop(e);
        sym *l = &e->syms[b.left], *r = &e->syms[b.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != b.len)
            continue; /* one side was merged away or grew since */
        l->id = b.result;
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (r->next >= 0)
            e->syms[r->next].prev = b.left;
        if (try_pair(e, l->prev, b.left) != 0 || try_pair(e, b.left, l->next) != 0)
            return KVC_E_NOMEM;
    }
    for (int32_t i = 0; i >= 0; i = e->syms[i].next) {
        int rc = e->syms[i].id >= 0 ? emit(e, e->syms[i].id)
                                    : emit_bytes(e, s + i, e->syms[i].len);
        if (rc != 0)
            return KVC_E_NOMEM;
    }
    if (whole >= 0 && memo == 0)
        atomic_store_explicit(&t->memo[whole], e->n == n0 + 1 && e->out[n0] == whole ? 1 : 2,
                              memory_order_relaxed);
    return KVC_OK;
}

/* The pre-tokenizer's sink: BPE for each piece of the current fragment. */
static kvc_status bpe_piece(void *ctx, size_t off, size_t len)
{
    enc *e = ctx;
    return bpe(e, e->frag_off + off, len);
}

/* Cuts the special tokens out of text, one token text at a time, longest
 * first, each in every text fragment left by the ones before (llama.cpp's
 * order: it decides which of two overlapping tokens wins). */
static kvc_status partition(const kvch_tokenizer *t, const char *text, size_t len,
                            int parse_special, frag **fr, size_t *nfr)
{
    frag *a = NULL, *b = NULL;
    size_t na = 0, ca = 0, nb = 0, cb = 0;
    if (grow(&a, &ca, 1, sizeof *a) != 0)
        return KVC_E_NOMEM;
    a[na++] = (frag){-1, 0, len};
    for (uint32_t k = 0; k < t->n_special; k++) {
        const special_tok *sp = &t->special[k];
        /* user-defined tokens are always cut out; control and unknown
         * ones only when asked */
        if (!parse_special && sp->type != TT_USER_DEFINED)
            continue;
        const char *st = t->text + t->text_off[sp->id];
        nb = 0;
        for (size_t i = 0; i < na; i++) {
            size_t pos = a[i].off, end = a[i].off + a[i].len;
            const char *m;
            while (a[i].id < 0 && pos < end && (m = memmem(text + pos, end - pos, st, sp->len))) {
                size_t at = (size_t)(m - text);
                if (grow(&b, &cb, nb + 2, sizeof *b) != 0)
                    goto oom;
                if (at > pos)
                    b[nb++] = (frag){-1, pos, at - pos};
                b[nb++] = (frag){sp->id, at, sp->len};
                pos = at + sp->len;
            }
            if (grow(&b, &cb, nb + 1, sizeof *b) != 0)
                goto oom;
            if (a[i].id >= 0)
                b[nb++] = a[i];
            else if (pos < end)
                b[nb++] = (frag){-1, pos, end - pos};
        }
        frag *tf = a;
        a = b;
        b = tf;
        size_t tc = ca;
        ca = cb;
        cb = tc;
        na = nb;
    }
    free(b);
    *fr = a;
    *nfr = na;
    return KVC_OK;
oom:
    free(a);
    free(b);
    return KVC_E_NOMEM;
}

kvc_status kvch_tok_encode(const kvch_tokenizer *t, const char *text, size_t len,
                           int parse_special, int32_t **ids, size_t *n)
{
    if (t == NULL || ids == NULL || n == NULL || (text == NULL && len > 0))
        return KVC_E_INVALID;
    if (len > INT32_MAX) /* symbol links are int32 */
        return KVC_E_INVALID;
    enc e = {.t = t, .text = (const unsigned char *)text};
    frag *fr = NULL;
    size_t nfr = 0;
    kvc_status st = KVC_OK;
    if (grow(&e.out, &e.cap, len / 4 + 16, sizeof *e.out) != 0)
        st = KVC_E_NOMEM;
    if (st == KVC_OK && len > 0)
        st = partition(t, text, len, parse_special, &fr, &nfr);
    for (size_t i = 0; i < nfr && st == KVC_OK; i++) {
        if (fr[i].id >= 0) {
            st = emit(&e, fr[i].id) == 0 ? KVC_OK : KVC_E_NOMEM;
        } else {
            e.frag_off = fr[i].off;
            st = kvch_pretok_split(t->pretok, text + fr[i].off, fr[i].len, bpe_piece, &e);
        }
    }
    free(fr);
    free(e.syms);
    free(e.heap);
    free(e.scratch);
    if (st != KVC_OK) {
        free(e.out);
        return st;
    }
    *ids = e.out;
    *n = e.n;
    return KVC_OK;
}

/* ---- decoding and lookups --------------------------------------------- */

size_t kvch_tok_piece(const kvch_tokenizer *t, int32_t id, char *buf, size_t cap)
{
    if (t == NULL || id < 0 || id >= t->n_vocab)
        return 0;
    size_t k = t->piece_off[id + 1] - t->piece_off[id];
    if (buf != NULL && cap > 0)
        memcpy(buf, t->piece + t->piece_off[id], k < cap ? k : cap);
    return k;
}

kvc_status kvch_tok_decode(const kvch_tokenizer *t, const int32_t *ids, size_t n, char **text,
                           size_t *len)
{
    if (t == NULL || text == NULL || len == NULL || (ids == NULL && n > 0))
        return KVC_E_INVALID;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return KVC_E_INVALID;
        total += t->piece_off[ids[i] + 1] - t->piece_off[ids[i]];
    }
    char *s = tmalloc(total + 1);
    if (s == NULL)
        return KVC_E_NOMEM;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = t->piece_off[ids[i] + 1] - t->piece_off[ids[i]];
        memcpy(s + o, t->piece + t->piece_off[ids[i]], k);
        o += k;
    }
    s[o] = '\0';
    *text = s;
    *len = o;
    return KVC_OK;
}

uint8_t kvch_tok_flags(const kvch_tokenizer *t, int32_t id)
{
    if (t == NULL || id < 0 || id >= t->n_vocab)
        return 0;
    return t->flags[id];
}

int32_t kvch_tok_n_vocab(const kvch_tokenizer *t)
{
    return t ? t->n_vocab : 0;
}

int32_t kvch_tok_bos(const kvch_tokenizer *t)
{
    return t ? t->bos : -1;
}

int32_t kvch_tok_eos(const kvch_tokenizer *t)
{
    return t ? t->eos : -1;
}

int32_t kvch_tok_find(const kvch_tokenizer *t, const char *text)
{
    if (t == NULL || text == NULL)
        return -1;
    return lookup_text(t, text, strlen(text));
}
