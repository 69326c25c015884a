/* model_config.h: private to the engine. Derives a model_config from a
 * Hugging Face config.json or from GGUF metadata, and fills the RoPE
 * frequency tables. Loader thread only. */
#ifndef INFERD_MODEL_CONFIG_H
#define INFERD_MODEL_CONFIG_H

#include <stddef.h>

#include "engine/gguf.h"
#include "engine/json.h"
#include "engine/model.h"

/* From config.json (already parsed). path names the file in messages.
 * Returns 0, or -1 with err set. */
int mc_from_hf(const struct json *cfg, const char *path, struct model_config *c,
               char *err, size_t errlen);

/* From a GGUF file's metadata and its rope factor tensors. Returns 0, or -1
 * with err set. Shapes of the other tensors are checked by the model. */
int mc_from_gguf(const struct gguf_file *f, const char *path,
                 struct model_config *c, char *err, size_t errlen);

#endif
