/*
 * unicode.h -- the Unicode side of the tokenizer: decoding and encoding one
 * UTF-8 code point, GPT-2's byte <-> code point table (the
 * "bytes_to_unicode" map every byte-level BPE vocabulary is spelled in:
 * "Ġworld" is " world"), and the pre-tokenizers, which split text by
 * Unicode letter, number and space classes before BPE.
 *
 * The classes themselves come from PCRE2 (UTF + UCP), not from tables of
 * ours. Pure functions and read-only objects: any thread.
 * Prefix kvch_utf8_ / kvch_gpt2_ / kvch_pretok_.
 */
#ifndef KVCH_UNICODE_H
#define KVCH_UNICODE_H

#include <stddef.h>
#include <stdint.h>

#include "kvc.h"

/* Returned by kvch_utf8_decode for a byte that does not start a valid,
 * complete, shortest-form sequence of a scalar value. */
#define KVCH_UTF8_INVALID UINT32_C(0xFFFFFFFF)

/* Decodes the code point at s[0..len) (len >= 1). Sets *adv to the bytes
 * consumed: the sequence length, or 1 for an invalid byte (overlong forms,
 * surrogates, values above U+10FFFF, truncated or bad continuation bytes),
 * in which case it returns KVCH_UTF8_INVALID. */
uint32_t kvch_utf8_decode(const unsigned char *s, size_t len, size_t *adv);

/* Writes cp (<= 0x10FFFF) as UTF-8 to out[4]; returns the byte count (1-4),
 * or 0 for a value above U+10FFFF. */
size_t kvch_utf8_encode(uint32_t cp, unsigned char out[4]);

/* GPT-2's map: printable Latin-1 bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF)
 * stand for themselves, the other 68 bytes for U+0100..U+0143 in byte
 * order. Always below U+0144, so at most 2 bytes of UTF-8. */
uint32_t kvch_gpt2_byte_to_cp(uint8_t b);

/* The inverse: the byte cp stands for, or -1 when cp is not in the map. */
int kvch_gpt2_cp_to_byte(uint32_t cp);

/* Spells in[0..n) in GPT-2's alphabet: writes at most 2*n bytes to out and
 * returns the count. */
size_t kvch_gpt2_encode(const unsigned char *in, size_t n, unsigned char *out);

/* Spells a vocabulary string s[0..n) back in bytes: writes at most n bytes
 * to out and returns the count. A character outside GPT-2's alphabet (or
 * an invalid byte) is copied as it is, where llama.cpp would write
 * "[UNK_BYTE_..]": no GPT-2-style vocabulary has one. */
size_t kvch_gpt2_decode(const unsigned char *s, size_t n, unsigned char *out);

/* ---- pre-tokenizers ---------------------------------------------------- */

typedef struct kvch_pretok kvch_pretok;

/* Compiles the pre-tokenizer llama.cpp uses for tokenizer.ggml.pre `name`
 * (len bytes, no NUL needed): its list of regexes, for PCRE2 with UTF, UCP
 * and MATCH_INVALID_UTF (invalid bytes match nothing and so end up in the
 * unmatched spans), JIT-compiled where possible. Sets *ignore_merges to
 * whether llama.cpp lets a piece that is a whole token skip BPE (the llama3
 * family). PCRE2's memory comes from `alloc` (malloc when NULL) and goes
 * back to free(). Errors: KVC_E_UNSUPPORTED naming an unknown name,
 * KVC_E_NOMEM; *out untouched then. */
kvc_status kvch_pretok_create(const char *name, size_t len, void *(*alloc)(size_t),
                              kvch_pretok **out, int *ignore_merges, char *err,
                              size_t err_size);
void kvch_pretok_free(kvch_pretok *p); /* NULL is a no-op */

/* Takes one final piece, text[off, off + len); a status other than KVC_OK
 * stops the split, which returns it. */
typedef kvc_status (*kvch_pretok_sink)(void *ctx, size_t off, size_t len);

/* Splits text[0..len) as llama.cpp's unicode_regex_split: the first regex
 * splits the text, each next one every piece of the one before, matched
 * and unmatched spans both kept, in order; every byte lands in exactly one
 * non-empty piece, handed to sink. Each piece is its own subject, so a
 * lookahead stops at its end. KVC_E_NOMEM, KVC_E_INTERNAL when PCRE2
 * fails, or the sink's status. Any thread. */
kvc_status kvch_pretok_split(const kvch_pretok *p, const char *text, size_t len,
                             kvch_pretok_sink sink, void *ctx);

#endif /* KVCH_UNICODE_H */
