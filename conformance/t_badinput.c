/*
 * t_badinput.c -- group "badinput": wrong input gets a status and a
 * message, never a crash, and changes nothing (KVC-REQ-5).
 *
 * Every case checks: a non-OK status of the expected kind, a non-empty
 * message that (where a word is cheap to expect) names the problem,
 * out-parameters untouched, and for sequence calls the sequence unchanged
 * (attend answers the same bytes, seq_stats the same token count) and
 * still usable (a valid append + attend right after succeeds).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conform.h"

#define M(s) (1u << (s))
#define KW(...) ((const char *const[]){__VA_ARGS__, NULL})
#define INV M(KVC_E_INVALID)
#define VER (M(KVC_E_VERSION) | M(KVC_E_INVALID)) /* a struct too small */
#define BLOB (M(KVC_E_CORRUPT) | M(KVC_E_VERSION) | M(KVC_E_INVALID)) /* KVC-REQ-13 */

/* ---- checks ------------------------------------------------------------------------- */

static const char *mask_words(unsigned mask)
{
    static char buf[160];
    static const char *const names[] = {"OK", "INVALID", "UNSUPPORTED", "NOMEM", "CORRUPT",
                                        "STATE", "VERSION", "BUFFER", "INTERNAL"};
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < 9; i++)
        if (mask & M(i))
            used += (size_t)snprintf(buf + used, sizeof buf - used, "%sKVC_E_%s",
                                     used ? " or " : "", names[i]);
    return buf;
}

static void expect_status(kvc_status st, unsigned mask, const char *what)
{
    ck_assert_msg(st != KVC_OK, "%s was accepted (KVC_OK)", what);
    ck_assert_msg(st > 0 && st < 32 && (mask & M(st)), "%s returned %d (%s), expected %s", what,
                  (int)st, kvch_status_string(st), mask_words(mask));
}

/* The message exists, is bounded, and mentions one of kw (NULL: any). */
static void msg_names(const char *m, const char *what, const char *const *kw)
{
    size_t n = m ? strnlen(m, 4097) : 0;
    ck_assert_msg(n > 0, "%s failed without a message", what);
    ck_assert_msg(n <= 4096, "%s: the message is not terminated within 4 KiB", what);
    char list[200] = "";
    size_t used = 0;
    for (int i = 0; kw && kw[i]; i++) {
        if (strcasestr(m, kw[i]))
            return;
        used += (size_t)snprintf(list + used, sizeof list - used, "%s'%s'", i ? ", " : "", kw[i]);
    }
    ck_assert_msg(kw == NULL, "%s: the message \"%s\" does not name the problem (none of %s)",
                  what, m, list);
}

/* Index of the first byte of p[from, to) other than v, or `to`. A loop of
 * ck_assert would be slow: each passing check is reported to the runner
 * through a pipe. */
static size_t first_not(const void *p, size_t from, size_t to, unsigned char v)
{
    while (from < to && ((const unsigned char *)p)[from] == v)
        from++;
    return from;
}

/* ---- create ----------------------------------------------------------------------- */

static void base_info(kc_env *e, const kvc_geometry *g, kvc_create_info *ci)
{
    memset(ci, 0, sizeof *ci);
    ci->struct_size = sizeof *ci;
    ci->host = &e->host;
    ci->geometry = g;
    kvch_options_apply(&KC.opts, ci);
    ci->device = KC.device;
    ci->dtype = KVC_DTYPE_F32;
}

#define MSG_CAP 256

/* create must refuse ci: status in mask, *out untouched, a message within
 * msg_size (bytes past it untouched) that names the problem. */
static void create_refused(kc_env *e, const kvc_create_info *ci, unsigned mask, const char *what,
                           const char *const *kw)
{
    kvc_instance *const sentinel = (kvc_instance *)(uintptr_t)0x5a5a50;
    kvc_instance *out = sentinel;
    char msg[2 * MSG_CAP], w[160];
    memset(msg, 'Z', sizeof msg);
    kvc_status st = e->p->create(ci, &out, msg, MSG_CAP);
    if (st == KVC_OK && out != sentinel && out != NULL)
        e->p->destroy(out);
    snprintf(w, sizeof w, "create with %s", what);
    expect_status(st, mask, w);
    ck_assert_msg(out == sentinel, "%s failed but wrote *out", w);
    ck_assert_msg(memchr(msg, 0, MSG_CAP) != NULL, "%s: no NUL within msg_size", w);
    size_t past = first_not(msg, MSG_CAP, sizeof msg, 'Z');
    ck_assert_msg(past == sizeof msg, "%s wrote past msg_size (byte %zu)", w, past);
    msg_names(msg, w, kw);
}

static void create_ok(kc_env *e, const kvc_create_info *ci, const char *what)
{
    kvc_instance *inst = NULL;
    char msg[MSG_CAP] = "";
    kvc_status st = e->p->create(ci, &inst, msg, sizeof msg);
    ck_assert_msg(st == KVC_OK && inst != NULL, "%s: create failed: %s: %s", what,
                  kvch_status_string(st), msg);
    e->p->destroy(inst);
}

/* ---- a sequence to abuse ---------------------------------------------------------------- */

#define NTOK 256   /* tokens available at positions 0..255 */
#define HELD 16    /* held on every layer before the cases */
#define OUT4 2048  /* floats of 4 queries' output in kc_geometry_small (4 x 8 x 64) */

typedef struct fix {
    kc_env e;
    kvc_geometry g;
    kvc_instance *inst;
    kvc_seq *s;
    kc_tokens t;
    int32_t next;        /* next position (and token index) a valid append may use */
    size_t kvd, qd;      /* floats per token of K/V and of Q */
    float ref[2][OUT4];  /* snapshot: 4 queries at HELD-4.. on layer 0 and the last layer */
    float *o;            /* guarded output for 4 queries */
    uint64_t tokens;     /* snapshot of tokens_appended */
} fix;

static uint64_t seq_tokens(fix *f, const kvc_seq *s)
{
    kvc_seq_stats ss = {.struct_size = sizeof ss};
    kvc_status st = f->e.p->seq_stats(s, &ss);
    ck_assert_msg(st == KVC_OK, "seq_stats: %s", kvch_status_string(st));
    return ss.tokens_appended;
}

/* Attends the snapshot queries of s on layer 0 and the last into dst. */
static void probe(fix *f, kvc_seq *s, float dst[2][OUT4], const char *when)
{
    for (int i = 0; i < 2; i++) {
        kvc_status st = f->e.p->attend(s, i ? f->g.n_layers - 1 : 0, 4, f->t.pos + HELD - 4,
                                       f->t.q + (HELD - 4) * f->qd, f->o);
        ck_assert_msg(st == KVC_OK, "attend %s: %s: %s", when, kvch_status_string(st),
                      f->e.p->seq_message(s));
        kc_guard_check(f->o, OUT4, "attend output");
        memcpy(dst[i], f->o, sizeof dst[i]);
    }
}

static void snapshot(fix *f)
{
    /* A prompt-phase plugin profiles and compresses on the first attend of
     * a layer (KVC_CAP_PROMPT_PHASE): the reference is what it answers
     * after that, when the same queries only read. */
    if (f->e.p->caps & KVC_CAP_PROMPT_PHASE)
        probe(f, f->s, f->ref, "(the prompt, before the snapshot)");
    probe(f, f->s, f->ref, "(snapshot)");
    f->tokens = seq_tokens(f, f->s);
}

/* The failed call changed nothing: same answers, same token count. */
static void unchanged(fix *f, const char *what)
{
    float now[2][OUT4];
    char when[160];
    snprintf(when, sizeof when, "after the refused %s", what);
    probe(f, f->s, now, when);
    ck_assert_msg(memcmp(now, f->ref, sizeof now) == 0,
                  "after the refused %s, attend answers differently: the sequence changed", what);
    uint64_t n = seq_tokens(f, f->s);
    ck_assert_msg(n == f->tokens, "after the refused %s the sequence holds %llu tokens, before "
                  "%llu", what, (unsigned long long)n, (unsigned long long)f->tokens);
}

/* A valid append of the next token on every layer and an attend succeed
 * (a plugin that kept part of a refused append fails here: positions). */
static void still_works(fix *f, const char *what)
{
    int32_t i = f->next;
    ck_assert_msg(i < NTOK, "the test ran out of tokens");
    for (uint32_t l = 0; l < f->g.n_layers; l++) {
        kvc_status st = f->e.p->append(f->s, l, 1, f->t.pos + i, f->t.k + i * f->kvd,
                                       f->t.v + i * f->kvd, f->t.flags + i);
        ck_assert_msg(st == KVC_OK, "after the refused %s, a valid append at %d (layer %u) "
                      "fails: %s: %s", what, i, l, kvch_status_string(st),
                      f->e.p->seq_message(f->s));
    }
    kvc_status st = f->e.p->attend(f->s, 0, 1, f->t.pos + i, f->t.q + i * f->qd, f->o);
    ck_assert_msg(st == KVC_OK, "after the refused %s, a valid attend fails: %s: %s", what,
                  kvch_status_string(st), f->e.p->seq_message(f->s));
    f->next++;
    snapshot(f);
}

/* A refused sequence call: status, message, nothing changed, still usable. */
static void seq_refused(fix *f, kvc_status st, unsigned mask, const char *what,
                        const char *const *kw)
{
    expect_status(st, mask, what);
    msg_names(f->e.p->seq_message(f->s), what, kw);
    unchanged(f, what);
    still_works(f, what);
}

static void fix_open(fix *f, uint64_t salt)
{
    if (KC.device != KVC_MEM_HOST)
        kc_skip("feeds host tensors: run with --device cpu");
    memset(f, 0, sizeof *f);
    kc_load(&f->e);
    f->g = kc_geometry_small();
    f->inst = kc_create_ready(&f->e, &f->g, NULL);
    kvc_status st = f->e.p->seq_open(f->inst, &f->s);
    ck_assert_msg(st == KVC_OK && f->s, "seq_open: %s", kvch_status_string(st));
    kc_rng r;
    kc_rng_init(&r, salt);
    kc_tokens_make(&f->t, &f->g, NTOK, 0, &r);
    f->kvd = (size_t)f->g.n_kv_heads * f->g.head_dim;
    f->qd = (size_t)f->g.n_heads * f->g.head_dim;
    ck_assert_msg(4 * f->qd == OUT4, "the small geometry changed: OUT4 must follow");
    f->o = kc_guarded(OUT4);
    for (uint32_t l = 0; l < f->g.n_layers; l++) {
        st = f->e.p->append(f->s, l, HELD, f->t.pos, f->t.k, f->t.v, f->t.flags);
        ck_assert_msg(st == KVC_OK, "append of %d tokens: %s: %s", HELD, kvch_status_string(st),
                      f->e.p->seq_message(f->s));
    }
    f->next = HELD;
    snapshot(f);
}

static void fix_close(fix *f)
{
    f->e.p->seq_close(f->s);
    f->e.p->destroy(f->inst);
    kc_tokens_free(&f->t);
    kc_guard_free(f->o);
    kc_unload(&f->e);
}

/* Appends one token at position `pos` with the next token's data. */
static kvc_status append_at(fix *f, uint32_t layer, int32_t pos)
{
    int32_t i = f->next;
    return f->e.p->append(f->s, layer, 1, &pos, f->t.k + i * f->kvd, f->t.v + i * f->kvd, NULL);
}

/* attend of n queries into a fresh guarded buffer of `room` queries; on
 * error the buffer must be untouched: no query written, not even a good
 * one before the bad. */
static kvc_status attend_guarded(fix *f, uint32_t layer, uint32_t n, const int32_t *pos,
                                 const float *q, size_t room, const char *what)
{
    float *o = kc_guarded(room * f->qd);
    kvc_status st = f->e.p->attend(f->s, layer, n, pos, q, o);
    kc_guard_check(o, room * f->qd, what);
    ck_assert_msg(st == KVC_OK || kc_guard_untouched(o, room * f->qd),
                  "%s failed (%s) but wrote its output", what, kvch_status_string(st));
    kc_guard_free(o);
    return st;
}

/* ---- create_args ----------------------------------------------------------------------- */

START_TEST(create_args)
{
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    kvc_create_info ci, bad;
    kvc_host h;
    base_info(&e, &g, &ci);
    char msg[MSG_CAP] = "";
    kvc_instance *out = NULL;
    expect_status(e.p->create(NULL, &out, msg, sizeof msg), INV, "create(info NULL)");
    ck_assert_msg(out == NULL, "create(info NULL) failed but wrote *out");
    msg_names(msg, "create(info NULL)", NULL);
    msg[0] = '\0';
    expect_status(e.p->create(&ci, NULL, msg, sizeof msg), INV, "create(out NULL)");
    msg_names(msg, "create(out NULL)", NULL);

    bad = ci, bad.host = NULL;
    create_refused(&e, &bad, INV, "host NULL", KW("host"));
    bad = ci, bad.geometry = NULL;
    create_refused(&e, &bad, INV, "geometry NULL", KW("geometr"));
    bad = ci, bad.host = &h, h = e.host, h.alloc = NULL;
    create_refused(&e, &bad, INV, "kvc_host.alloc NULL", KW("alloc"));
    h = e.host, h.free = NULL;
    create_refused(&e, &bad, INV, "kvc_host.free NULL", KW("free"));
    bad = ci, bad.device = 7;
    create_refused(&e, &bad, INV | M(KVC_E_UNSUPPORTED), "device 7", KW("device"));
    bad = ci, bad.dtype = 9;
    create_refused(&e, &bad, INV | M(KVC_E_UNSUPPORTED), "dtype 9", KW("type"));
    bad = ci, bad.n_options = 2, bad.option_names = NULL, bad.option_values = NULL;
    create_refused(&e, &bad, INV, "2 options and NULL arrays", KW("option"));
    const char *names[1] = {"kv_ratio"}, *values[1] = {NULL};
    bad.n_options = 1, bad.option_names = names, bad.option_values = values;
    create_refused(&e, &bad, INV, "an option value NULL", KW("option", "kv_ratio"));
    names[0] = NULL, values[0] = "1";
    create_refused(&e, &bad, INV, "an option name NULL", KW("option"));

    /* msg NULL is allowed, and a short msg_size is respected. */
    bad = ci, bad.host = NULL;
    expect_status(e.p->create(&bad, &out, NULL, 0), INV, "create(msg NULL)");
    char small[16];
    memset(small, 'Z', sizeof small);
    expect_status(e.p->create(&bad, &out, small, 6), INV, "create(msg_size 6)");
    ck_assert_msg(memchr(small, 0, 6) != NULL, "create with msg_size 6: no NUL in the 6 bytes");
    ck_assert_msg(first_not(small, 6, 16, 'Z') == 16, "create with msg_size 6 wrote past it");
    ck_assert_msg(out == NULL, "a refused create wrote *out");
    create_ok(&e, &ci, "after the refused creates");
    kc_figure("14 bad creates refused");
    kc_unload(&e);
}
END_TEST

/* ---- null_handles ---------------------------------------------------------------------- */

START_TEST(null_handles)
{
    fix f;
    fix_open(&f, 0x4a11);
    const kvc_plugin *p = f.e.p;
    const unsigned inv_uns = INV | M(KVC_E_UNSUPPORTED); /* where a capability may be absent */
    p->destroy(NULL); /* release functions take NULL (KVC-REQ-16) */
    p->seq_close(NULL);

    const int32_t *pos = f.t.pos;
    const float *data = f.t.q;
    float *o = kc_guarded(OUT4);
    size_t sz = 12345;
    kvc_instance_stats is;
    kvc_seq_stats ss;
    memset(&is, 0x5a, sizeof is);
    memset(&ss, 0x5a, sizeof ss);
    is.struct_size = sizeof is, ss.struct_size = sizeof ss;
    kvc_seq *sq = (kvc_seq *)(uintptr_t)0x5a5a58;
    uint32_t counts[8];
    kvc_materialized m = {.struct_size = sizeof m, .n_tokens = counts};

    expect_status(p->prepare_layer(NULL, 0, NULL, NULL), inv_uns, "prepare_layer(NULL)");
    expect_status(p->finalize_layer(NULL, 0), inv_uns, "finalize_layer(NULL)");
    expect_status(p->finalize(NULL), INV, "finalize(NULL)");
    expect_status(p->save(NULL, NULL, 0, &sz), inv_uns, "save(NULL)");
    expect_status(p->instance_stats(NULL, &is), INV, "instance_stats(NULL)");
    ck_assert_msg(is.bytes_params == 0x5a5a5a5a5a5a5a5aull, "instance_stats(NULL) wrote *out");
    expect_status(p->seq_open(NULL, &sq), INV, "seq_open(NULL)");
    ck_assert_msg(sq == (kvc_seq *)(uintptr_t)0x5a5a58, "seq_open(NULL) wrote *out");
    expect_status(p->append(NULL, 0, 1, pos, data, data, NULL), INV, "append(NULL)");
    expect_status(p->attend(NULL, 0, 1, pos, data, o), INV, "attend(NULL)");
    ck_assert_msg(kc_guard_untouched(o, OUT4), "attend(NULL) wrote its output");
    kvc_attend_item it = {.struct_size = sizeof it, .n_q = 1, .seq = NULL, .positions = pos,
                          .q_pre = data, .out = o};
    const kvc_attend_item *items[1] = {&it};
    expect_status(p->attend_batch(NULL, 0, 1, items), INV, "attend_batch(NULL instance)");
    expect_status(p->materialize(NULL, 0, &m), inv_uns, "materialize(NULL)");
    expect_status(p->truncate(NULL, 0), INV, "truncate(NULL)");
    expect_status(p->fork(NULL, NULL), inv_uns, "fork(NULL, NULL)");
    expect_status(p->seq_export(NULL, NULL, 0, &sz), inv_uns, "seq_export(NULL)");
    ck_assert_msg(sz == 12345, "save or seq_export of a NULL handle wrote *size");
    expect_status(p->seq_import(NULL, data, 64), inv_uns, "seq_import(NULL)");
    expect_status(p->seq_stats(NULL, &ss), INV, "seq_stats(NULL)");
    ck_assert_msg(ss.tokens_appended == 0x5a5a5a5a5a5a5a5aull, "seq_stats(NULL) wrote *out");

    /* NULL partners of valid handles. */
    expect_status(p->fork(f.s, NULL), inv_uns, "fork(seq, NULL)");
    expect_status(p->fork(NULL, f.s), inv_uns, "fork(NULL, seq)");
    expect_status(p->attend_batch(f.inst, 0, 1, NULL), INV, "attend_batch(items NULL)");
    items[0] = NULL;
    expect_status(p->attend_batch(f.inst, 0, 1, items), INV, "attend_batch(items[0] NULL)");
    items[0] = &it;
    expect_status(p->attend_batch(f.inst, 0, 1, items), INV, "attend_batch(item seq NULL)");
    ck_assert_msg(kc_guard_untouched(o, OUT4), "a refused attend_batch wrote its output");
    kc_guard_check(o, OUT4, "attend output");
    kc_guard_free(o);
    unchanged(&f, "NULL-handle calls");
    still_works(&f, "NULL-handle calls");
    kc_figure("21 NULL-handle calls refused");
    fix_close(&f);
}
END_TEST

/* ---- null_data ------------------------------------------------------------------------- */

START_TEST(null_data)
{
    fix f;
    fix_open(&f, 0xd47a);
    const kvc_plugin *p = f.e.p;
    const char *const *kw = KW("null", "missing", "pointer", "given");
    /* Each case reads f.next afresh: still_works moves it on. */
#define POS (f.t.pos + f.next)
#define KEY (f.t.k + f.next * f.kvd)
#define VAL (f.t.v + f.next * f.kvd)
#define QPOS (f.t.pos + f.next - 1)
#define QRY (f.t.q + (f.next - 1) * f.qd)
    seq_refused(&f, p->append(f.s, 0, 1, NULL, KEY, VAL, NULL), INV, "append(positions NULL)", kw);
    seq_refused(&f, p->append(f.s, 0, 1, POS, NULL, VAL, NULL), INV, "append(k_pre NULL)", kw);
    seq_refused(&f, p->append(f.s, 0, 1, POS, KEY, NULL, NULL), INV, "append(v NULL)", kw);
    seq_refused(&f, p->attend(f.s, 0, 1, NULL, QRY, f.o), INV, "attend(positions NULL)", kw);
    seq_refused(&f, p->attend(f.s, 0, 1, QPOS, NULL, f.o), INV, "attend(q_pre NULL)", kw);
    seq_refused(&f, p->attend(f.s, 0, 1, QPOS, QRY, NULL), INV, "attend(out NULL)", kw);
    if (p->caps & KVC_CAP_MATERIALIZE) {
        kvc_materialized m = {.struct_size = sizeof m};
        seq_refused(&f, p->materialize(f.s, 0, NULL), INV, "materialize(out NULL)", NULL);
        seq_refused(&f, p->materialize(f.s, 0, &m), INV, "materialize(n_tokens NULL)", NULL);
    }
    if (p->caps & KVC_CAP_EXPORT) {
        seq_refused(&f, p->seq_export(f.s, NULL, 0, NULL), INV, "seq_export(size NULL)", NULL);
        seq_refused(&f, p->seq_import(f.s, NULL, 64), INV | M(KVC_E_CORRUPT),
                    "seq_import(blob NULL, size 64)", NULL);
    }
    /* Calls on const objects have no message to leave: status only. */
    expect_status(p->seq_open(f.inst, NULL), INV, "seq_open(out NULL)");
    expect_status(p->seq_stats(f.s, NULL), INV, "seq_stats(out NULL)");
    expect_status(p->instance_stats(f.inst, NULL), INV, "instance_stats(out NULL)");
    if (p->caps & KVC_CAP_ARTIFACT)
        expect_status(p->save(f.inst, NULL, 0, NULL), INV, "save(size NULL)");
    /* flags == NULL is valid: all zero. */
    for (uint32_t l = 0; l < f.g.n_layers; l++) {
        kvc_status st = p->append(f.s, l, 1, POS, KEY, VAL, NULL);
        ck_assert_msg(st == KVC_OK, "append with flags NULL (allowed) failed: %s: %s",
                      kvch_status_string(st), p->seq_message(f.s));
    }
#undef POS
#undef KEY
#undef VAL
#undef QPOS
#undef QRY
    kc_figure("NULL data pointers refused, flags NULL accepted");
    fix_close(&f);
}
END_TEST

/* ---- struct_size ------------------------------------------------------------------------ */

START_TEST(struct_size)
{
    fix f;
    fix_open(&f, 0x5123);
    kc_env *e = &f.e;
    const char *const *kw = KW("size", "version", "struct");
    kvc_geometry gb;
    kvc_host h;
    kvc_create_info ci;
    char what[96];
    unsigned n = 0;
    for (uint32_t sz = 0; sz <= 1; sz++) {
        for (int which = 0; which < 3; which++, n++) {
            base_info(e, &f.g, &ci);
            gb = f.g, h = e->host;
            if (which == 0)
                ci.struct_size = sz;
            else if (which == 1)
                gb.struct_size = sz, ci.geometry = &gb;
            else
                h.struct_size = sz, ci.host = &h;
            snprintf(what, sizeof what, "%s.struct_size %u",
                     which == 0 ? "kvc_create_info" : which == 1 ? "kvc_geometry" : "kvc_host", sz);
            create_refused(e, &ci, VER, what, kw);
        }
        /* Outputs filled "up to struct_size": nothing past it, whatever
         * the status. */
        unsigned char buf[128], orig[128];
        memset(buf, 0xa5, sizeof buf);
        memcpy(buf, &sz, sizeof sz);
        memcpy(orig, buf, sizeof buf);
        kvc_status st = e->p->seq_stats(f.s, (kvc_seq_stats *)(void *)buf);
        ck_assert_msg(memcmp(buf + 4, orig + 4, sizeof buf - 4) == 0,
                      "seq_stats with struct_size %u returned %s and wrote past it", sz,
                      kvch_status_string(st));
        st = e->p->instance_stats(f.inst, (kvc_instance_stats *)(void *)buf);
        ck_assert_msg(memcmp(buf + 4, orig + 4, sizeof buf - 4) == 0,
                      "instance_stats with struct_size %u returned %s and wrote past it", sz,
                      kvch_status_string(st));
        /* Inputs the plugin must read fields of: refused. */
        float *o = kc_guarded(f.qd);
        kvc_attend_item it = {.struct_size = sz, .n_q = 1, .seq = f.s,
                              .positions = f.t.pos + f.next - 1, .q_pre = f.t.q, .out = o};
        const kvc_attend_item *items[1] = {&it};
        snprintf(what, sizeof what, "attend_batch with item struct_size %u", sz);
        st = e->p->attend_batch(f.inst, 0, 1, items);
        kc_guard_check(o, f.qd, what);
        ck_assert_msg(st == KVC_OK || kc_guard_untouched(o, f.qd), "%s wrote the output", what);
        kc_guard_free(o);
        /* No message: the item's seq lies past its struct_size, unreadable. */
        expect_status(st, VER, what);
        unchanged(&f, what);
        still_works(&f, what);
        n++;
        if (e->p->caps & KVC_CAP_MATERIALIZE) {
            uint32_t counts[4] = {77, 77, 77, 77};
            kvc_materialized m = {.struct_size = sz, .n_tokens = counts};
            snprintf(what, sizeof what, "materialize with struct_size %u", sz);
            seq_refused(&f, e->p->materialize(f.s, 0, &m), VER, what, NULL);
            ck_assert_msg(counts[0] == 77 && counts[1] == 77, "%s wrote n_tokens", what);
            n++;
        }
    }
    /* Preparation inputs, for a plugin that takes them. */
    if (e->p->caps & (KVC_CAP_NEEDS_WEIGHTS | KVC_CAP_NEEDS_CALIBRATION)) {
        kvc_instance *raw = NULL;
        char msg[MSG_CAP];
        kvc_status st = kc_create(e, &f.g, NULL, &raw, msg, sizeof msg);
        ck_assert_msg(st == KVC_OK && raw, "create: %s: %s", kvch_status_string(st), msg);
        kvc_layer_weights w = {.struct_size = 1};
        kvc_calib_chunk c = {.struct_size = 1, .n_rows = 1};
        if (e->p->caps & KVC_CAP_NEEDS_WEIGHTS)
            expect_status(e->p->prepare_layer(raw, 0, &w, NULL), VER,
                          "prepare_layer with kvc_layer_weights.struct_size 1"), n++;
        if (e->p->caps & KVC_CAP_NEEDS_CALIBRATION)
            expect_status(e->p->prepare_layer(raw, 0, NULL, &c), VER,
                          "prepare_layer with kvc_calib_chunk.struct_size 1"), n++;
        e->p->destroy(raw);
    }
    kc_figure("%u struct sizes of 0 and 1 refused, stats untouched past them", n);
    fix_close(&f);
}
END_TEST

/* ---- geometry ----------------------------------------------------------------------------- */

START_TEST(geometry)
{
    kc_env e;
    kc_load(&e);
    static const float nan_freq[32] = {1.0f, NAN};
    /* A uint32 field set to `value`; attn_scale and rope_inv_freq apart. */
#define G(f) offsetof(kvc_geometry, f)
    static const struct {
        const char *what;
        size_t field;
        uint32_t value;
        const char *kw[6];
    } cases[] = {
        {"n_heads 9 over n_kv_heads 2", G(n_heads), 9, {"head", NULL}},
        {"n_kv_heads 0", G(n_kv_heads), 0, {"head", NULL}},
        {"head_dim 0", G(head_dim), 0, {"dim", "head", NULL}},
        {"odd head_dim 63 with RoPE", G(head_dim), 63, {"dim", "rope", "even", "odd", NULL}},
        {"n_layers 0", G(n_layers), 0, {"layer", NULL}},
        {"rope_dims 128 > head_dim 64", G(rope_dims), 128, {"rope", "dim", NULL}},
        {"odd rope_dims 33", G(rope_dims), 33, {"rope", "dim", "even", "odd", NULL}},
        {"max_positions 0", G(max_positions), 0, {"position", "max", NULL}},
        {"rope_style 99", G(rope_style), 99, {"rope", "style", NULL}},
        {"kv_head_first 2 of 2 KV heads", G(kv_head_first), 2, {"shard", "head", "kv", NULL}},
        {"kv_head_count 3 of 2 KV heads", G(kv_head_count), 3, {"shard", "head", "kv", NULL}},
        {"attn_scale NaN", G(attn_scale), 0, {"scale", NULL}},
        {"rope_inv_freq holding NaN", G(rope_inv_freq), 0, {"freq", "rope", "finite", "nan", NULL}},
    };
    kvc_create_info ci;
    kvc_geometry g;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        g = kc_geometry_small();
        if (cases[i].field == G(attn_scale))
            g.attn_scale = NAN;
        else if (cases[i].field == G(rope_inv_freq))
            g.rope_inv_freq = nan_freq;
        else
            memcpy((char *)&g + cases[i].field, &cases[i].value, sizeof(uint32_t));
        base_info(&e, &g, &ci);
        create_refused(&e, &ci, INV, cases[i].what, cases[i].kw);
    }
#undef G
    g = kc_geometry_small();
    base_info(&e, &g, &ci);
    create_ok(&e, &ci, "the valid geometry after the refused ones");
    kc_figure("%zu bad geometries refused", sizeof cases / sizeof cases[0]);
    kc_unload(&e);
}
END_TEST

/* ---- layer_and_positions --------------------------------------------------------------------- */

START_TEST(layer_and_positions)
{
    fix f;
    fix_open(&f, 0x1a7e);
    const kvc_plugin *p = f.e.p;
    const char *const *lkw = KW("layer"), *const *pkw = KW("pos");
    const uint32_t L = f.g.n_layers, bad_layers[] = {L, L + 1000, UINT32_MAX};
    const int32_t max = (int32_t)f.g.max_positions;
    char what[96];
    for (size_t i = 0; i < 3; i++) {
        uint32_t l = bad_layers[i];
        snprintf(what, sizeof what, "append to layer %u of %u", l, L);
        seq_refused(&f, append_at(&f, l, f.next), INV, what, lkw);
        snprintf(what, sizeof what, "attend on layer %u of %u", l, L);
        seq_refused(&f, attend_guarded(&f, l, 1, f.t.pos + f.next - 1, f.t.q, 1, what), INV,
                    what, lkw);
        if (p->caps & KVC_CAP_MATERIALIZE) {
            uint32_t counts[8];
            kvc_materialized m = {.struct_size = sizeof m, .n_tokens = counts};
            snprintf(what, sizeof what, "materialize of layer %u of %u", l, L);
            seq_refused(&f, p->materialize(f.s, l, &m), INV, what, lkw);
        }
    }
    expect_status(p->finalize_layer(f.inst, L), INV | M(KVC_E_STATE), "finalize_layer(n_layers)");
    msg_names(p->instance_message(f.inst), "finalize_layer(n_layers)", NULL);

    /* One token at a position out of range or not after the last held
     * (-2: the last held, -3: an earlier one). */
    const struct {
        const char *what;
        int32_t pos;
    } one[] = {{"append at position -1", -1}, {"append at INT32_MIN", INT32_MIN},
               {"append at max_positions", max}, {"append at INT32_MAX", INT32_MAX},
               {"append at the last position held", -2}, {"append before the last held", -3}};
    for (size_t i = 0; i < sizeof one / sizeof one[0]; i++) {
        int32_t pos = one[i].pos == -2 ? f.next - 1 : one[i].pos == -3 ? 3 : one[i].pos;
        seq_refused(&f, append_at(&f, 1, pos), INV, one[i].what, pkw);
    }
    /* Two tokens, the second bad: a plugin appending token by token would
     * keep the first, which unchanged() and still_works() catch. */
    const struct {
        const char *what;
        int d0, d1; /* offsets from f.next; d1 == 1000 stands for max_positions */
    } two[] = {{"append with decreasing positions", 4, 3},
               {"append with a duplicated position", 4, 4},
               {"append whose second position is out of range", 4, 1000}};
    for (size_t i = 0; i < sizeof two / sizeof two[0]; i++) {
        int32_t pos[2] = {f.next + two[i].d0, two[i].d1 == 1000 ? max : f.next + two[i].d1};
        int32_t k = f.next;
        seq_refused(&f, p->append(f.s, 2, 2, pos, f.t.k + k * f.kvd, f.t.v + k * f.kvd, NULL),
                    INV, two[i].what, pkw);
    }
    const int32_t qbad[] = {-1, max, INT32_MIN};
    for (size_t i = 0; i < 3; i++) {
        int32_t pos[2] = {f.next - 1, qbad[i]};
        snprintf(what, sizeof what, "attend with a query at position %d", qbad[i]);
        seq_refused(&f, attend_guarded(&f, 0, 2, pos, f.t.q, 2, what), INV, what, pkw);
    }
    kc_figure("layers %u, %u, %u and 12 bad positions refused", L, L + 1000, UINT32_MAX);
    fix_close(&f);
}
END_TEST

/* ---- token_counts ------------------------------------------------------------------------ */

START_TEST(token_counts)
{
    fix f;
    fix_open(&f, 0x70c5);
    const kvc_plugin *p = f.e.p;
    seq_refused(&f, p->append(f.s, 0, 0, f.t.pos + f.next, f.t.k, f.t.v, NULL), INV,
                "append of 0 tokens", NULL);
    seq_refused(&f, attend_guarded(&f, 0, 0, f.t.pos, f.t.q, 1, "attend of 0 queries"), INV,
                "attend of 0 queries", NULL);

    /* UINT32_MAX tokens behind small buffers: refusable from n alone (more
     * than max_positions can never be strictly increasing), so it must be
     * refused without reading past the buffers or asking for terabytes.
     * The second position repeats (or, for queries, is negative) for
     * plugins that walk the positions first. */
    uint64_t grew = 0;
    for (int call = 0; call < 2; call++) {
        kvch_tracker_stats t0, t1;
        kvch_tracker_reset_peak(f.e.tr);
        kvch_tracker_get(f.e.tr, &t0);
        int32_t dup[2] = {f.next, f.next}, qpos[2] = {f.next - 1, -1};
        const char *what = call ? "attend of UINT32_MAX queries" : "append of UINT32_MAX tokens";
        kvc_status st = call ? attend_guarded(&f, 0, UINT32_MAX, qpos, f.t.q, 1, what)
                             : p->append(f.s, 0, UINT32_MAX, dup, f.t.k, f.t.v, NULL);
        kvch_tracker_get(f.e.tr, &t1);
        ck_assert_msg(t1.n_failed == t0.n_failed, "refusing the %s, the plugin asked for an "
                      "allocation the host could not give: check n before allocating", what);
        uint64_t g1 = t1.peak[KVC_MEM_HOST] - t0.current[KVC_MEM_HOST];
        ck_assert_msg(g1 < (64u << 20), "refusing the %s, the plugin allocated %llu bytes first",
                      what, (unsigned long long)g1);
        grew = g1 > grew ? g1 : grew;
        seq_refused(&f, st, INV, what, NULL);
    }

    /* At the max_positions boundary: max tokens fit, max + 1 cannot. */
    kvc_geometry g = kc_geometry_small();
    g.max_positions = 64;
    kvc_instance *inst = kc_create_ready(&f.e, &g, NULL);
    kvc_seq *s = NULL;
    kvc_status st = p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s, "seq_open: %s", kvch_status_string(st));
    expect_status(p->append(s, 0, 65, f.t.pos, f.t.k, f.t.v, NULL), INV,
                  "append of 65 tokens with max_positions 64");
    msg_names(p->seq_message(s), "append of 65 tokens with max_positions 64", NULL);
    st = p->append(s, 0, 64, f.t.pos, f.t.k, f.t.v, NULL);
    ck_assert_msg(st == KVC_OK, "append of 64 tokens at 0..63 with max_positions 64 (valid) "
                  "failed: %s: %s", kvch_status_string(st), p->seq_message(s));
    float *o64 = kc_guarded(64 * f.qd);
    st = p->attend(s, 0, 64, f.t.pos, f.t.q, o64);
    ck_assert_msg(st == KVC_OK, "attend of 64 queries at 0..63 with max_positions 64 failed: "
                  "%s: %s", kvch_status_string(st), p->seq_message(s));
    kc_guard_check(o64, 64 * f.qd, "attend of 64 queries");
    kc_guard_free(o64);
    p->seq_close(s);
    p->destroy(inst);
    kc_figure("0, UINT32_MAX, max_positions+1 refused; %llu B allocated meanwhile",
              (unsigned long long)grew);
    fix_close(&f);
}
END_TEST

/* ---- non_finite --------------------------------------------------------------------------- */

START_TEST(non_finite)
{
    fix f;
    fix_open(&f, 0x4a4e);
    const char *const *kw = KW("nan", "inf", "finite");
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    const char *const bad_name[3] = {"NaN", "+Inf", "-Inf"};
    char what[96];
    float buf[3 * 128], q[2 * 512];
    ck_assert_msg(3 * f.kvd <= 3 * 128 && 2 * f.qd <= 2 * 512, "the small geometry changed");
    for (int tensor = 0; tensor < 2; tensor++)
        for (int b = 0; b < 3; b++) {
            /* Three tokens, the bad value in a different one each time:
             * none of the three may be kept. */
            int32_t k0 = f.next;
            size_t n3 = 3 * f.kvd, at = b == 0 ? 0 : b == 1 ? n3 - 1 : f.kvd + f.kvd / 2;
            memcpy(buf, (tensor ? f.t.v : f.t.k) + k0 * f.kvd, n3 * sizeof(float));
            buf[at] = bad[b];
            const float *k = tensor ? f.t.k + k0 * f.kvd : buf;
            const float *v = tensor ? buf : f.t.v + k0 * f.kvd;
            snprintf(what, sizeof what, "append with %s in %s (token %zu)", bad_name[b],
                     tensor ? "V" : "K", at / f.kvd);
            seq_refused(&f, f.e.p->append(f.s, 1, 3, f.t.pos + k0, k, v, NULL), INV, what, kw);
        }
    for (int b = 0; b < 3; b++) {
        int32_t pos[2] = {f.next - 2, f.next - 1};
        size_t at = b == 0 ? 0 : b == 1 ? 2 * f.qd - 1 : f.qd + 7;
        memcpy(q, f.t.q + pos[0] * f.qd, 2 * f.qd * sizeof(float));
        q[at] = bad[b];
        snprintf(what, sizeof what, "attend with %s in Q (query %zu)", bad_name[b], at / f.qd);
        seq_refused(&f, attend_guarded(&f, 3, 2, pos, q, 2, what), INV, what, kw);
    }
    kc_figure("NaN, +Inf, -Inf in K, V and Q refused (9 cases)");
    fix_close(&f);
}
END_TEST

/* ---- options ------------------------------------------------------------------------------ */

/* create with the one option name=value (not KC.opts): refused, naming it. */
static void option_refused(kc_env *e, const kvc_geometry *g, const char *name, const char *value,
                           const char *kw)
{
    kvc_create_info ci;
    base_info(e, g, &ci);
    const char *names[1] = {name}, *values[1] = {value};
    ci.n_options = 1, ci.option_names = names, ci.option_values = values;
    char what[160];
    snprintf(what, sizeof what, "option %s=\"%s\"", name, value);
    create_refused(e, &ci, INV, what, kw ? (const char *const[]){kw, NULL} : NULL);
}

START_TEST(options)
{
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    unsigned n = 2;
    option_refused(&e, &g, "kvc_conform_no_such_option", "1", "kvc_conform_no_such_option");
    option_refused(&e, &g, "", "1", NULL);
    for (uint32_t i = 0; i < e.p->n_options && i < 256; i++) {
        const kvc_option_desc *d = e.p->options[i];
        ck_assert_msg(d != NULL && d->name != NULL, "options[%u] or its name is NULL", i);
        const char *vals[6] = {NULL};
        char lo[64] = "", hi[64] = "";
        int nv = 0;
        /* Never "": as a default it means unset, so a plugin may read it so. */
        if (d->type == KVC_OPT_BOOL)
            vals[nv++] = "maybe";
        if (d->type == KVC_OPT_ENUM)
            vals[nv++] = "kvc_conform_not_a_choice";
        if (d->type == KVC_OPT_INT) {
            vals[nv++] = "abc", vals[nv++] = "12abc", vals[nv++] = "1.5";
            if (d->min > -9e15)
                snprintf(lo, sizeof lo, "%lld", (long long)ceil(d->min) - 1), vals[nv++] = lo;
            if (d->max < 9e15)
                snprintf(hi, sizeof hi, "%lld", (long long)floor(d->max) + 1), vals[nv++] = hi;
        }
        if (d->type == KVC_OPT_FLOAT) {
            vals[nv++] = "abc", vals[nv++] = "nan", vals[nv++] = "inf";
            if (d->min > -1e300)
                snprintf(lo, sizeof lo, "%.17g", d->min - fmax(fabs(d->min), 1)), vals[nv++] = lo;
            if (d->max < 1e300)
                snprintf(hi, sizeof hi, "%.17g", d->max + fmax(fabs(d->max), 1)), vals[nv++] = hi;
        }
        for (int j = 0; j < nv; j++, n++) /* free text (KVC_OPT_STRING) takes anything */
            option_refused(&e, &g, d->name, vals[j], d->name);
    }
    kvc_create_info ci;
    base_info(&e, &g, &ci);
    create_ok(&e, &ci, "the run's options after the refused ones");
    kc_figure("%u bad option values refused", n);
    kc_unload(&e);
}
END_TEST

/* ---- corrupted blobs ------------------------------------------------------------------------ */

typedef void (*blob_try)(void *ctx, const char *what, const void *bytes, size_t n);

/* Calls try for damaged copies of blob: empty, truncated, bit-flipped,
 * foreign. Truncated copies are malloc'ed at their exact size, so a read
 * past the end is caught by ASan. Returns the number of cases. */
static unsigned corruptions(const unsigned char *blob, size_t size, kc_rng *r, blob_try try,
                            void *ctx)
{
    unsigned n = 0;
    char what[96];
    unsigned char *c = malloc(size + 1);
    ck_assert_msg(c != NULL, "out of memory in the test");
    memcpy(c, blob, size);
    try(ctx, "an empty blob (size 0)", c, 0), n++;
    size_t cut[] = {1, 4, 16, 47, 48, 64, size / 2, size - 1};
    for (size_t i = 0; i < sizeof cut / sizeof cut[0]; i++) {
        if (cut[i] == 0 || cut[i] >= size || (i && cut[i] == cut[i - 1]))
            continue;
        unsigned char *tr = malloc(cut[i]);
        ck_assert_msg(tr != NULL, "out of memory in the test");
        memcpy(tr, blob, cut[i]);
        snprintf(what, sizeof what, "the blob truncated to %zu of %zu bytes", cut[i], size);
        try(ctx, what, tr, cut[i]), n++;
        free(tr);
    }
    /* Header fields at fixed places, the middle, the end, then random:
     * every byte is covered by a checksum (KVC-REQ-13). */
    size_t at[20] = {0, 3, 4, 8, 12, 16, 24, 40, 44, 48, size / 2, size - 1};
    for (int i = 12; i < 20; i++)
        at[i] = (size_t)((kc_rng_f(r) + 1.0f) * 0.5f * (float)size) % size;
    for (int i = 0; i < 20; i++) {
        if (at[i] >= size)
            continue;
        memcpy(c, blob, size);
        c[at[i]] ^= (unsigned char)(1u << (at[i] * 7 % 8));
        snprintf(what, sizeof what, "the blob with a bit flipped at byte %zu of %zu", at[i], size);
        try(ctx, what, c, size), n++;
    }
    for (size_t i = 0; i < size; i++)
        c[i] = (unsigned char)(kc_rng_f(r) * 127.0f + 128.0f);
    try(ctx, "foreign bytes", c, size), n++;
    if (size >= 4) { /* foreign bytes behind a plausible magic */
        memcpy(c, blob, 4);
        try(ctx, "foreign bytes behind the blob's magic", c, size), n++;
    }
    free(c);
    return n;
}

/* Size-then-copy of inst's artifact (s == NULL) or of s's export into a
 * malloc'ed buffer. */
static unsigned char *blob_of(kc_env *e, kvc_instance *inst, kvc_seq *s, size_t *size)
{
    const char *what = s ? "seq_export" : "save";
    kvc_status st = s ? e->p->seq_export(s, NULL, 0, size) : e->p->save(inst, NULL, 0, size);
    ck_assert_msg(st == KVC_OK && *size > 0, "%s (size): %s, %zu bytes: %s", what,
                  kvch_status_string(st), *size,
                  s ? e->p->seq_message(s) : e->p->instance_message(inst));
    unsigned char *b = malloc(*size);
    ck_assert_msg(b != NULL, "out of memory in the test");
    size_t got = 0;
    st = s ? e->p->seq_export(s, b, *size, &got) : e->p->save(inst, b, *size, &got);
    ck_assert_msg(st == KVC_OK && got == *size, "%s: %s, %zu of %zu bytes: %s", what,
                  kvch_status_string(st), got, *size,
                  s ? e->p->seq_message(s) : e->p->instance_message(inst));
    return b;
}

typedef struct art_ctx {
    kc_env *e;
    const kvc_geometry *g;
} art_ctx;

static void try_artifact(void *ctx, const char *what, const void *bytes, size_t n)
{
    art_ctx *a = ctx;
    kvc_create_info ci;
    base_info(a->e, a->g, &ci);
    ci.artifact = bytes, ci.artifact_size = n;
    char w[160];
    snprintf(w, sizeof w, "artifact %s", what);
    create_refused(a->e, &ci, BLOB, w, NULL);
}

START_TEST(artifact_corruption)
{
    kc_env e;
    kc_load(&e);
    kvc_geometry g = kc_geometry_small();
    art_ctx a = {&e, &g};
    kvc_create_info ci;
    base_info(&e, &g, &ci);
    if (!(e.p->caps & KVC_CAP_ARTIFACT)) {
        /* Given an artifact it cannot load, a plugin says so. */
        static const unsigned char junk[64] = {'K', 'V', 'C', '1', 1};
        ci.artifact = junk, ci.artifact_size = sizeof junk;
        create_refused(&e, &ci, BLOB | M(KVC_E_UNSUPPORTED), "an artifact, without "
                       "KVC_CAP_ARTIFACT", NULL);
        kc_unload(&e);
        kc_skip("no KVC_CAP_ARTIFACT (a given artifact was refused)");
    }
    kvc_instance *inst = kc_create_ready(&e, &g, NULL);
    size_t size = 0;
    unsigned char *art = blob_of(&e, inst, NULL, &size);
    e.p->destroy(inst);
    ci.artifact = art, ci.artifact_size = size;
    create_ok(&e, &ci, "create from the saved artifact");
    kc_rng r;
    kc_rng_init(&r, 0xa27f);
    unsigned n = corruptions(art, size, &r, try_artifact, &a);
    /* Someone else's artifact: another geometry's. */
    kvc_geometry g3 = kc_geometry_small();
    g3.n_layers = 3;
    inst = kc_create_ready(&e, &g3, NULL);
    free(art);
    art = blob_of(&e, inst, NULL, &size);
    e.p->destroy(inst);
    try_artifact(&a, "made for 3 layers, loaded for 4", art, size), n++;
    free(art);
    kc_figure("%u damaged or foreign artifacts refused", n);
    kc_unload(&e);
}
END_TEST

static void try_import(void *ctx, const char *what, const void *bytes, size_t n)
{
    fix *f = ctx;
    char w[160];
    snprintf(w, sizeof w, "seq_import of %s", what);
    expect_status(f->e.p->seq_import(f->s, bytes, n), BLOB, w);
    msg_names(f->e.p->seq_message(f->s), w, NULL);
    unchanged(f, w); /* KVC-REQ-13: import changes nothing on failure */
}

/* A sequence of a new instance of geometry g holding 8 tokens, exported. */
static unsigned char *export_other(fix *f, const kvc_geometry *g, size_t *size)
{
    kvc_instance *inst = kc_create_ready(&f->e, g, NULL);
    kvc_seq *s = NULL;
    kvc_status st = f->e.p->seq_open(inst, &s);
    ck_assert_msg(st == KVC_OK && s, "seq_open: %s", kvch_status_string(st));
    for (uint32_t l = 0; l < g->n_layers; l++) {
        st = f->e.p->append(s, l, 8, f->t.pos, f->t.k, f->t.v, NULL);
        ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st),
                      f->e.p->seq_message(s));
    }
    unsigned char *b = blob_of(&f->e, inst, s, size);
    f->e.p->seq_close(s);
    f->e.p->destroy(inst);
    return b;
}

START_TEST(export_corruption)
{
    fix f;
    fix_open(&f, 0xe4c0);
    const kvc_plugin *p = f.e.p;
    if (!(p->caps & KVC_CAP_EXPORT)) {
        fix_close(&f);
        kc_skip("no KVC_CAP_EXPORT");
    }
    /* The source: a second sequence with other data, so that an import
     * would visibly change the target (the fixture's sequence). */
    kvc_seq *src = NULL;
    kvc_status st = p->seq_open(f.inst, &src);
    ck_assert_msg(st == KVC_OK && src, "seq_open: %s", kvch_status_string(st));
    for (uint32_t l = 0; l < f.g.n_layers; l++) {
        st = p->append(src, l, HELD, f.t.pos, f.t.k + 100 * f.kvd, f.t.v + 100 * f.kvd, NULL);
        ck_assert_msg(st == KVC_OK, "append: %s: %s", kvch_status_string(st), p->seq_message(src));
    }
    size_t size = 0, size3 = 0;
    unsigned char *blob = blob_of(&f.e, f.inst, src, &size), *other;
    kc_rng r;
    kc_rng_init(&r, 0xe4c1);
    unsigned n = corruptions(blob, size, &r, try_import, &f) + 2;
    kvc_geometry g3 = kc_geometry_small();
    g3.n_layers = 3;
    other = export_other(&f, &g3, &size3);
    try_import(&f, "an export of a 3-layer geometry", other, size3);
    free(other);
    g3 = kc_geometry_small();
    g3.rope_theta = 500000.0f; /* same shape, other RoPE: the keys would be wrong */
    other = export_other(&f, &g3, &size3);
    try_import(&f, "an export made with rope_theta 500000", other, size3);
    free(other);

    /* The intact blob is accepted and makes the target answer like the
     * source: the cases above failed for their damage, not by accident. */
    st = p->seq_import(f.s, blob, size);
    ck_assert_msg(st == KVC_OK, "seq_import of the intact export failed: %s: %s",
                  kvch_status_string(st), p->seq_message(f.s));
    float want[2][OUT4], got[2][OUT4];
    probe(&f, src, want, "on the source");
    probe(&f, f.s, got, "after the intact import");
    ck_assert_msg(memcmp(want, got, sizeof want) == 0,
                  "after importing an intact export, attend differs from the source");
    free(blob);
    p->seq_close(src);
    kc_figure("%u damaged or foreign exports refused", n);
    fix_close(&f);
}
END_TEST

/* ---- buffers ------------------------------------------------------------------------------ */

#define BGUARD 64

/* size-then-copy with buffers too small: BUFFER, the required size in
 * *size, the buffer untouched; then the exact size works. */
static void size_then_copy(fix *f, int is_save, const char *what)
{
    const kvc_plugin *p = f->e.p;
    size_t need = 0;
    kvc_status st = is_save ? p->save(f->inst, NULL, 0, &need)
                            : p->seq_export(f->s, NULL, 0, &need);
    ck_assert_msg(st == KVC_OK && need > 0, "%s(NULL): %s, size %zu", what,
                  kvch_status_string(st), need);
    unsigned char *b = malloc(need + BGUARD);
    ck_assert_msg(b != NULL, "out of memory in the test");
    size_t sizes[] = {0, 1, need / 2, need - 1, need};
    char w[96];
    for (size_t i = 0; i < 5; i++) {
        if (i && sizes[i] == sizes[i - 1])
            continue;
        memset(b, 0xc5, need + BGUARD);
        size_t got = 0;
        st = is_save ? p->save(f->inst, b, sizes[i], &got)
                     : p->seq_export(f->s, b, sizes[i], &got);
        snprintf(w, sizeof w, "%s into %zu bytes (%zu needed)", what, sizes[i], need);
        if (sizes[i] == need) {
            ck_assert_msg(st == KVC_OK, "%s: %s", w, kvch_status_string(st));
        } else {
            expect_status(st, M(KVC_E_BUFFER), w);
            msg_names(is_save ? p->instance_message(f->inst) : p->seq_message(f->s), w, NULL);
        }
        ck_assert_msg(got == need, "%s: *size %zu, not the %zu needed", w, got, need);
        size_t j = first_not(b, sizes[i] == need ? need : 0, need + BGUARD, 0xc5);
        ck_assert_msg(j == need + BGUARD, "%s wrote byte %zu of the buffer", w, j);
    }
    free(b);
}

START_TEST(buffers)
{
    fix f;
    fix_open(&f, 0xb0f0);
    const kvc_plugin *p = f.e.p;
    if (!(p->caps & (KVC_CAP_MATERIALIZE | KVC_CAP_EXPORT | KVC_CAP_ARTIFACT))) {
        fix_close(&f);
        kc_skip("no materialize, export or artifact: no caller buffers to size");
    }
    unsigned n = 0;
    const uint32_t nkv = f.g.n_kv_heads, d = f.g.head_dim;
    /* materialize twice: capacity one below the largest count, then exactly
     * it (counted again: the refusal's still_works added a token). */
    for (int exact = 0; exact < 2 && (p->caps & KVC_CAP_MATERIALIZE); exact++, n++) {
        uint32_t counts[64], most = 0;
        memset(counts, 0x5a, sizeof counts);
        kvc_materialized m = {.struct_size = sizeof m, .n_tokens = counts};
        kvc_status st = p->materialize(f.s, 0, &m);
        ck_assert_msg(st == KVC_OK, "materialize (counts): %s: %s", kvch_status_string(st),
                      p->seq_message(f.s));
        ck_assert_msg(counts[nkv] == 0x5a5a5a5au, "materialize wrote n_tokens past %u heads", nkv);
        for (uint32_t h = 0; h < nkv; h++) {
            ck_assert_msg(counts[h] <= (uint32_t)f.next, "materialize counts %u tokens on head "
                          "%u, %d were appended", counts[h], h, f.next);
            most = counts[h] > most ? counts[h] : most;
        }
        ck_assert_msg(most > 0, "materialize counts no token after %d were appended", f.next);
        uint32_t cap = exact ? most : most - 1;
        size_t np = (size_t)nkv * cap + 1, nf = np * d; /* + 1: never a 0-float buffer */
        float *pos = kc_guarded(np), *k = kc_guarded(nf), *v = kc_guarded(nf);
        kvc_materialized mm = {.struct_size = sizeof mm, .capacity = cap, .n_tokens = counts,
                               .positions = (int32_t *)(void *)pos, .k = k, .v = v};
        st = p->materialize(f.s, 0, &mm);
        kc_guard_check(pos, np, "materialize positions");
        kc_guard_check(k, nf, "materialize k");
        kc_guard_check(v, nf, "materialize v");
        int untouched = kc_guard_untouched(pos, np) && kc_guard_untouched(k, nf) &&
                        kc_guard_untouched(v, nf);
        kc_guard_free(pos), kc_guard_free(k), kc_guard_free(v);
        if (exact) {
            ck_assert_msg(st == KVC_OK, "materialize with capacity %u = the count: %s: %s", cap,
                          kvch_status_string(st), p->seq_message(f.s));
            continue;
        }
        ck_assert_msg(st != KVC_E_BUFFER || untouched,
                      "materialize refused capacity %u but wrote the arrays", cap);
        seq_refused(&f, st, M(KVC_E_BUFFER), "materialize with capacity below the count", NULL);
    }
    if (p->caps & KVC_CAP_EXPORT)
        size_then_copy(&f, 0, "seq_export"), n += 5;
    if (p->caps & KVC_CAP_ARTIFACT)
        size_then_copy(&f, 1, "save"), n += 5;
    kc_figure("%u buffer sizes: BUFFER with the size, or OK", n);
    fix_close(&f);
}
END_TEST

void kc_group_badinput(Suite *s)
{
    kc_add(s, "badinput", "create_args", create_args, 20);
    kc_add(s, "badinput", "null_handles", null_handles, 20);
    kc_add(s, "badinput", "null_data", null_data, 20);
    kc_add(s, "badinput", "struct_size", struct_size, 20);
    kc_add(s, "badinput", "geometry", geometry, 20);
    kc_add(s, "badinput", "layer_and_positions", layer_and_positions, 20);
    kc_add(s, "badinput", "token_counts", token_counts, 20);
    kc_add(s, "badinput", "non_finite", non_finite, 20);
    kc_add(s, "badinput", "options", options, 20);
    kc_add(s, "badinput", "artifact_corruption", artifact_corruption, 30);
    kc_add(s, "badinput", "export_corruption", export_corruption, 30);
    kc_add(s, "badinput", "buffers", buffers, 20);
}
