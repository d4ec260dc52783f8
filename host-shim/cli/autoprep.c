/* autoprep.c -- preparation on demand and the artifact cache (autoprep.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "autoprep.h"

/* ---- the key -------------------------------------------------------------------- */

#define FNV_PRIME UINT64_C(0x100000001b3)
#define KEY_FORMAT "kvc-autoprep-key-1" /* change when the serialization changes */

uint64_t autoprep_fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * FNV_PRIME;
    return h;
}

static uint64_t put_u64(uint64_t h, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    return autoprep_fnv1a(h, b, 8);
}

/* Length-prefixed, so that ("ab", "c") and ("a", "bc") differ. */
static uint64_t put_bytes(uint64_t h, const void *p, size_t n)
{
    return autoprep_fnv1a(put_u64(h, n), p, n);
}

static uint64_t put_str(uint64_t h, const char *s)
{
    return put_bytes(h, s ? s : "", s ? strlen(s) : 0);
}

/* Size, first and last AUTOPREP_MODEL_ENDS bytes of the file at path. */
static int put_model(uint64_t *h, const char *path, char *err, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(err, cap, "model %s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    const uint64_t size = (uint64_t)st.st_size;
    const size_t ends = size < AUTOPREP_MODEL_ENDS ? (size_t)size : AUTOPREP_MODEL_ENDS;
    unsigned char *buf = malloc(ends ? ends : 1);
    int rc = buf ? 0 : -1;
    if (!buf)
        snprintf(err, cap, "model %s: out of memory", path);
    *h = put_u64(*h, size);
    for (int end = 0; end < 2 && !rc; end++) {
        const off_t at = end ? (off_t)(size - ends) : 0;
        size_t got = 0;
        while (got < ends) {
            ssize_t k = pread(fd, buf + got, ends - got, at + (off_t)got);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                snprintf(err, cap, "model %s: %s", path, k < 0 ? strerror(errno) : "file shrank");
                rc = -1;
                break;
            }
            got += (size_t)k;
        }
        if (!rc)
            *h = put_bytes(*h, buf, ends);
    }
    free(buf);
    close(fd);
    return rc;
}

/* Size and every byte of the file at path. */
static int put_file(uint64_t *h, const char *path, char *err, size_t cap)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, cap, "plugin %s: %s", path, strerror(errno));
        return -1;
    }
    unsigned char buf[1 << 16];
    uint64_t size = 0, hh = AUTOPREP_FNV_OFFSET;
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, f)) > 0) {
        hh = autoprep_fnv1a(hh, buf, k);
        size += k;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        snprintf(err, cap, "plugin %s: read error", path);
        return -1;
    }
    *h = put_u64(put_u64(*h, size), hh);
    return 0;
}

int autoprep_key(const autoprep_key_in *in, uint64_t *key, char *err, size_t cap)
{
    uint64_t h = put_str(AUTOPREP_FNV_OFFSET, KEY_FORMAT);
    if (put_model(&h, in->model_path, err, cap))
        return -1;
    h = put_str(h, in->plugin_id);
    h = put_str(h, in->plugin_version);
    h = put_u64(h, in->plugin_path != NULL);
    if (in->plugin_path && put_file(&h, in->plugin_path, err, cap))
        return -1;
    /* Options sorted by name (names are unique in a kvch_options), without
     * calib_note: the note describes the calibration, which is keyed below. */
    uint32_t idx[KVCH_MAX_OPTIONS], n = 0;
    for (uint32_t i = 0; in->opts && i < in->opts->n; i++) {
        if (!strcmp(in->opts->names[i], "calib_note"))
            continue;
        uint32_t j = n++;
        for (; j > 0 && strcmp(in->opts->names[idx[j - 1]], in->opts->names[i]) > 0; j--)
            idx[j] = idx[j - 1];
        idx[j] = i;
    }
    h = put_u64(h, n);
    for (uint32_t k = 0; k < n; k++) {
        h = put_str(h, in->opts->names[idx[k]]);
        h = put_str(h, in->opts->values[idx[k]]);
    }
    h = put_u64(h, in->n_calib);
    for (size_t i = 0; i < in->n_calib; i++)
        h = put_str(h, in->calib[i]);
    h = put_u64(h, in->calib_tokens);
    h = put_u64(h, in->calib_ctx);
    h = put_u64(h, in->max_positions);
    *key = h;
    return 0;
}

/* ---- places ----------------------------------------------------------------------- */

int autoprep_cache_dir(char *buf, size_t cap)
{
    const char *e = getenv("KVC_ARTIFACT_CACHE"), *x = getenv("XDG_CACHE_HOME"),
               *home = getenv("HOME");
    int n;
    if (cap)
        buf[0] = '\0';
    if (e && *e) {
        if (!strcasecmp(e, "off"))
            return 0;
        n = snprintf(buf, cap, "%s", e);
    } else if (x && *x) {
        n = snprintf(buf, cap, "%s/kvc/artifacts", x);
    } else if (home && *home) {
        n = snprintf(buf, cap, "%s/.cache/kvc/artifacts", home);
    } else {
        return -1;
    }
    if (n < 0 || (size_t)n >= cap) {
        if (cap)
            buf[0] = '\0';
        return -1;
    }
    return 1;
}

int autoprep_mkdirs(const char *dir, char *err, size_t cap)
{
    char p[4096];
    size_t len = strlen(dir);
    if (!len || len >= sizeof p) {
        snprintf(err, cap, "%s: %s", dir, len ? "path too long" : "empty path");
        return -1;
    }
    memcpy(p, dir, len + 1);
    for (size_t i = 1; i <= len; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        char c = p[i];
        p[i] = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            snprintf(err, cap, "cannot create %s: %s", p, strerror(errno));
            return -1;
        }
        p[i] = c;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, cap, "%s: not a directory", dir);
        return -1;
    }
    return 0;
}

int autoprep_path(char *buf, size_t cap, const char *dir, const char *plugin_id, uint64_t key)
{
    char id[128];
    size_t i = 0;
    for (; plugin_id && plugin_id[i] && i + 1 < sizeof id; i++) {
        char c = plugin_id[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-' || c == '_' || (c == '.' && i > 0);
        id[i] = ok ? c : '_';
    }
    id[i] = '\0';
    int n = snprintf(buf, cap, "%s/%s-%016llx.kvca", dir, i ? id : "plugin",
                     (unsigned long long)key);
    if (n < 0 || (size_t)n >= cap) {
        if (cap)
            buf[0] = '\0';
        return -1;
    }
    return 0;
}

int autoprep_write_atomic(const char *path, const void *data, size_t size, char *err, size_t cap)
{
    char tmp[4200];
    int n = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof tmp) {
        snprintf(err, cap, "%s: path too long", path);
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) {
        snprintf(err, cap, "cannot create %s: %s", tmp, strerror(errno));
        return -1;
    }
    const char *p = data;
    size_t done = 0;
    const char *what = NULL;
    while (done < size && !what) {
        ssize_t k = write(fd, p + done, size - done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            what = "write";
        else
            done += (size_t)k;
    }
    if (!what && fsync(fd) != 0)
        what = "fsync";
    int e = errno;
    if (close(fd) != 0 && !what) {
        what = "close";
        e = errno;
    }
    if (!what && rename(tmp, path) != 0) {
        what = "rename";
        e = errno;
    }
    if (what) {
        snprintf(err, cap, "%s %s: %s", what, tmp, strerror(e));
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* ---- session_open's steps ---------------------------------------------------------- */

int autoprep_lookup(kvc_session *s, const char *cmd, const kvc_session_args *a,
                    const char *model_path, char *cache_path, size_t cap)
{
    char dir[4096], err[1024];
    cache_path[0] = '\0';
    int on = autoprep_cache_dir(dir, sizeof dir);
    if (on == 0)
        return 1;
    if (on < 0) {
        fprintf(stderr, "kvc %s: warning: no place for the artifact cache (set "
                        "KVC_ARTIFACT_CACHE or HOME); %s will be prepared and not cached\n",
                cmd, s->p->id);
        return 1;
    }
    size_t n_files = 0;
    const char *const *files = NULL;
    if (s->p->caps & KVC_CAP_NEEDS_CALIBRATION)
        files = session_calib_files(a, &n_files);
    autoprep_key_in in = {
        .model_path = model_path, .plugin_id = s->p->id, .plugin_version = s->p->version,
        .plugin_path = kvch_plugin_path(s->lib),
        .opts = &a->opts, .calib = files, .n_calib = n_files,
        .calib_tokens = files ? a->calib_tokens : 0, .calib_ctx = files ? session_calib_ctx(a) : 0,
        .max_positions = s->geo.max_positions,
    };
    uint64_t key;
    if (autoprep_key(&in, &key, err, sizeof err)) {
        fprintf(stderr, "kvc %s: warning: artifact cache: %s; %s will be prepared and not cached\n",
                cmd, err, s->p->id);
        return 1;
    }
    if (autoprep_path(cache_path, cap, dir, s->p->id, key)) {
        fprintf(stderr, "kvc %s: warning: artifact cache directory %s: path too long; %s will "
                        "be prepared and not cached\n", cmd, dir, s->p->id);
        return 1;
    }
    if (access(cache_path, F_OK) != 0)
        return 1; /* a miss */
    char *blob = NULL;
    size_t size = 0;
    if (kvch_read_file(cache_path, &blob, &size, err, sizeof err)) {
        fprintf(stderr, "kvc %s: warning: cached artifact %s; preparing %s again\n", cmd, err,
                s->p->id);
        return 1;
    }
    kvc_status st = session_create(s, blob, size, err, sizeof err);
    if (st == KVC_OK) {
        free(s->artifact);
        s->artifact = blob;
        s->artifact_size = size;
        fprintf(stderr, "kvc %s: using cached %s artifact %s\n", cmd, s->p->id, cache_path);
        return 0;
    }
    free(blob);
    if (st == KVC_E_CORRUPT || st == KVC_E_VERSION || st == KVC_E_INVALID) {
        fprintf(stderr, "kvc %s: warning: %s refuses its cached artifact %s (%s: %s); removing "
                        "it and preparing again\n",
                cmd, s->p->id, cache_path, kvch_status_string(st), err);
        if (unlink(cache_path) != 0 && errno != ENOENT)
            fprintf(stderr, "kvc %s: warning: cannot remove %s: %s\n", cmd, cache_path,
                    strerror(errno));
        return 1;
    }
    fprintf(stderr, "kvc %s: %s: create from cached artifact %s: %s: %s\n", cmd, s->p->id,
            cache_path, kvch_status_string(st), err);
    return -1;
}

typedef struct progress_state {
    int tty;
    double stage_t0;
    char stage[64];
} progress_state;

static void progress(void *user, const char *stage, uint64_t done, uint64_t total)
{
    progress_state *ps = user;
    double now = session_now();
    if (strncmp(ps->stage, stage, sizeof ps->stage - 1)) {
        snprintf(ps->stage, sizeof ps->stage, "%s", stage);
        ps->stage_t0 = now;
    }
    if (ps->tty) {
        fprintf(stderr, "\r  %s %llu/%llu  %.1f s   ", stage, (unsigned long long)done,
                (unsigned long long)total, now - ps->stage_t0);
        if (done >= total)
            fputc('\n', stderr);
    } else if (done >= total) {
        fprintf(stderr, "  %s %llu/%llu in %.1f s\n", stage, (unsigned long long)done,
                (unsigned long long)total, now - ps->stage_t0);
    }
    fflush(stderr);
}

static void human_bytes(char *buf, size_t cap, size_t n)
{
    if (n < 1024)
        snprintf(buf, cap, "%zu bytes", n);
    else if (n < (size_t)1 << 20)
        snprintf(buf, cap, "%.1f KiB", n / 1024.0);
    else
        snprintf(buf, cap, "%.1f MiB", n / 1048576.0);
}

int autoprep_prepare(kvc_session *s, const char *cmd, const kvc_session_args *a,
                     const char *cache_path)
{
    const uint64_t caps = s->p->caps;
    const int seq = session_sequential(s, a);

    char opts[1024] = "default options", on[1300];
    size_t n = 0;
    for (uint32_t i = 0; i < a->opts.n && n < sizeof opts; i++)
        if (strcmp(a->opts.names[i], "calib_note"))
            n += (size_t)snprintf(opts + n, sizeof opts - n, "%s%s=%s", n ? ", " : "",
                                  a->opts.names[i], a->opts.values[i]);
    const int w = !!(caps & KVC_CAP_NEEDS_WEIGHTS), c = !!(caps & KVC_CAP_NEEDS_CALIBRATION);
    snprintf(on, sizeof on, "%s%s%s%s", w ? "the model's weights" : "", w && c ? " and " : "",
             c ? s->calib_note : "", c && seq ? ", sequential" : "");
    fprintf(stderr, "kvc %s: preparing %s (%s) on %s ...\n", cmd, s->p->id, opts, on);
    fflush(stderr);

    progress_state ps = {.tty = isatty(2)};
    kvch_prepare_params pp = {.n_ctx = session_calib_ctx(a), .max_tokens = 0,
                              .progress = progress, .user = &ps, .sequential = seq};
    kvch_prepare_result r;
    char err[1024];
    const double t0 = session_now();
    if (kvch_prepare(s->p, s->inst, s->model.llama, s->calib, s->n_calib, &pp, &r, err,
                     sizeof err)) {
        fprintf(stderr, "kvc %s: %s\n", cmd, err);
        return 1;
    }
    const double dt = session_now() - t0;
    if (!cache_path || !(caps & KVC_CAP_ARTIFACT)) {
        fprintf(stderr, "kvc %s: prepared in %.1f s, not cached%s\n", cmd, dt,
                !(caps & KVC_CAP_ARTIFACT) ? " (the plugin cannot save an artifact)" : "");
        return 0;
    }

    /* The instance is prepared: from here on a failure only costs the cache. */
    size_t size = 0;
    void *blob = NULL;
    kvc_status st = s->p->save(s->inst, NULL, 0, &size);
    if (!st && !(blob = malloc(size ? size : 1)))
        st = KVC_E_NOMEM;
    if (!st)
        st = s->p->save(s->inst, blob, size, &size);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", cache_path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir)
        *slash = '\0';
    if (st) {
        fprintf(stderr, "kvc %s: prepared in %.1f s; warning: not cached: save: %s: %s\n", cmd, dt,
                kvch_status_string(st), st == KVC_E_NOMEM ? "" : s->p->instance_message(s->inst));
    } else if (autoprep_mkdirs(dir, err, sizeof err) ||
               autoprep_write_atomic(cache_path, blob, size, err, sizeof err)) {
        fprintf(stderr, "kvc %s: prepared in %.1f s; warning: not cached: %s\n", cmd, dt, err);
    } else {
        char hb[64];
        human_bytes(hb, sizeof hb, size);
        fprintf(stderr, "kvc %s: prepared in %.1f s, cached at %s (%s)\n", cmd, dt, cache_path,
                hb);
    }
    free(blob);
    return 0;
}
