/*
 * tokenizer.h -- byte-level BPE built from a GGUF's own vocabulary
 * (tokenizer.ggml.tokens, token_type, merges), with the model's
 * pre-tokenizer (tokenizer.ggml.pre; "smollm": digits split one by one,
 * then the GPT-2-style pattern with Unicode letter and number classes),
 * special/control tokens, and decoding back to bytes.
 *
 * Gives llama.cpp's token ids for the same text. Read-only after creation:
 * any thread may encode/decode at once. Prefix kvch_tok.
 */
#ifndef KVCH_TOKENIZER_H
#define KVCH_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "kvc.h"

typedef struct kvch_tokenizer kvch_tokenizer;

/* Builds the tokenizer from g's metadata (copied: g may be closed after).
 * Errors name what is missing or unsupported (tokenizer.ggml.model other
 * than "gpt2", an unknown pre-tokenizer name, a merge naming an unknown
 * token). */
kvc_status kvch_tok_from_gguf(const kvch_gguf *g, kvch_tokenizer **out, char *err,
                              size_t err_size);
void kvch_tok_free(kvch_tokenizer *t);

/* Encodes text [len bytes of UTF-8; invalid bytes are encoded as their
 * byte tokens; a byte the vocabulary has no token for is dropped, as
 * llama.cpp drops it: SmolLM2's lacks 21 (0x04 0x06 0x13 0x14 0x16 0x1D
 * 0xC0 0xC1 0xF1 0xF2 0xF5..0xFF)] into *ids (malloc'd, caller frees,
 * non-NULL even when *n is 0) and *n. With parse_special, control tokens
 * written in the text ("<|im_start|>") become their ids; without, they are
 * encoded as plain text (user-defined tokens are cut out either way, as in
 * llama.cpp). No BOS is added. KVC_E_INVALID for NULL arguments or
 * len > INT32_MAX, KVC_E_NOMEM when an allocation fails (*ids untouched).
 * Any thread, at once. */
kvc_status kvch_tok_encode(const kvch_tokenizer *t, const char *text, size_t len,
                           int parse_special, int32_t **ids, size_t *n);

/* The bytes of one token (byte-level BPE mapped back to raw bytes; control
 * tokens give their text). Size-then-copy: returns the byte count, writes
 * min(count, cap) bytes to buf (buf may be NULL with cap 0). Returns 0 for
 * an id out of range. */
size_t kvch_tok_piece(const kvch_tokenizer *t, int32_t id, char *buf, size_t cap);

/* Decodes ids [n] into *text (malloc'd, NUL-terminated, caller frees) and
 * *len. decode(encode(s)) == s for every s whose bytes all have a token
 * (all text, valid UTF-8 or not, for a vocabulary with the 256 byte
 * tokens). KVC_E_INVALID for an id out of range. */
kvc_status kvch_tok_decode(const kvch_tokenizer *t, const int32_t *ids, size_t n, char **text,
                           size_t *len);

/* KVC_TOKEN_SPECIAL for control/special tokens (token_type CONTROL, BOS,
 * EOS), KVC_TOKEN_PUNCT for other tokens whose bytes are only ASCII
 * punctuation and whitespace, at least one of them punctuation ("," or
 * " (", not " "); 0 otherwise and for an id out of range. */
uint8_t kvch_tok_flags(const kvch_tokenizer *t, int32_t id);

int32_t kvch_tok_n_vocab(const kvch_tokenizer *t);
int32_t kvch_tok_bos(const kvch_tokenizer *t); /* -1 when none */
int32_t kvch_tok_eos(const kvch_tokenizer *t); /* -1 when none */
/* Id of the token whose text is exactly `text` (e.g. "<|im_end|>"), or -1.
 * The text is the vocabulary's own spelling: GPT-2's byte alphabet for
 * normal tokens ("\xc4\xa0world", i.e. "Ġworld", for " world"). */
int32_t kvch_tok_find(const kvch_tokenizer *t, const char *text);

/* Test hook: makes the n-th allocation the tokenizer makes from now on
 * (in kvch_tok_from_gguf, encode, decode, PCRE2 included) fail, once;
 * 0 disables. Process-wide: for single-threaded tests of the out-of-memory
 * paths only. */
void kvch_tok_debug_fail_alloc(uint64_t n);

#endif /* KVCH_TOKENIZER_H */
