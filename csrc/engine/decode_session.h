/* A decode session: the steps of generate() after the prefill, one token per row per step,
 * queued with no host round trip. The step's bookkeeping runs on the backend and the
 * attention reads `past` from backend memory, so one recorded step serves many: where the
 * backend can capture (CUDA graphs), a step is recorded once and replayed, and recorded again
 * only when the keys outgrow the bound it was recorded for. The host reads the made tokens
 * every few steps. */
#ifndef XO_DECODER_H
#define XO_DECODER_H

#include "engine/model.h"

typedef struct xo_decoder xo_decoder;

typedef struct {
    const int32_t *tokens;       /* host [batch]: each row's last token (the prefill's) */
    const uint8_t *finished;     /* host [batch]: rows already finished */
    int first_step;              /* index of the first token the session makes (1 after the prefill's) */
    int ring;                    /* steps the backend keeps before the host must read them */
    const int32_t *eos;          /* host [num_eos] */
    int num_eos;
    int32_t pad_id;
    int min_new_tokens;          /* EOS is suppressed for token indices below this */
    const struct xo_device_draw *draw; /* NULL: greedy (argmax); its step is ignored */
} xo_decoder_params;

/* Steps grow the cache when it is full (up to max_position_embeddings). */
xo_status xo_decoder_create(xo_decoder **out, xo_model *m, xo_cache *cache, const xo_decoder_params *p);
/* Queues one step. */
xo_status xo_decoder_step(xo_decoder *d);
/* Waits for the queued steps and copies the tokens of steps [first, first + count) (count at
 * most the ring) to host [count, batch]. */
xo_status xo_decoder_read(xo_decoder *d, int32_t *host, int first, int count);
/* Waits for the queued steps, brings the cache's host-side state up to date and frees. */
xo_status xo_decoder_free(xo_decoder *d);

#endif
