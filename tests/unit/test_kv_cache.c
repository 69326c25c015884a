/* test_kv_cache.c: the paged KV cache through its header: block accounting,
 * all-or-nothing reservation, block tables, reuse after close, and that
 * every block's K and V regions are distinct. */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv_cache.h"

static int failures;
#define CHECK(cond) do { if (!(cond)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); failures++; } } while (0)

int main(void)
{
    char err[256];
    struct kv_geom g = {3, 2, 8};
    CHECK(kv_bytes_per_token(&g) == 2 * 3 * 2 * 8 * 4);
    CHECK(kv_create(&g, 0, 1, err, sizeof(err)) == NULL && strstr(err, "invalid size"));
    struct kv_cache *kv = kv_create(&g, 10, 4, err, sizeof(err));
    CHECK(kv != NULL);
    CHECK(kv_n_blocks(kv) == 10 && kv_free_blocks(kv) == 10);

    int a = kv_seq_open(kv, 0), b = kv_seq_open(kv, 1);
    CHECK(a >= 0 && b >= 0 && a != b);
    CHECK(kv_seq_rope_long(kv, a) == 0 && kv_seq_rope_long(kv, b) == 1);
    CHECK(kv_seq_reserve(kv, a, 1) == 0 && kv_seq_capacity(kv, a) == KV_BLOCK_TOKENS);
    CHECK(kv_seq_reserve(kv, a, KV_BLOCK_TOKENS) == 0 && kv_free_blocks(kv) == 9);
    CHECK(kv_seq_reserve(kv, a, KV_BLOCK_TOKENS + 1) == 0 && kv_free_blocks(kv) == 8);
    /* All or nothing: 9 blocks wanted, 8 free. */
    CHECK(kv_seq_reserve(kv, b, 9 * KV_BLOCK_TOKENS) == -1);
    CHECK(kv_free_blocks(kv) == 8 && kv_seq_capacity(kv, b) == 0);
    CHECK(kv_seq_reserve(kv, b, 8 * KV_BLOCK_TOKENS) == 0 && kv_free_blocks(kv) == 0);

    /* Block tables: distinct blocks, and distinct memory per layer/K/V. */
    int64_t na, nb;
    const int32_t *ta = kv_seq_blocks(kv, a, &na);
    const int32_t *tb = kv_seq_blocks(kv, b, &nb);
    CHECK(na == 2 && nb == 8);
    int seen[10] = {0};
    for (int64_t i = 0; i < na; i++)
        seen[ta[i]]++;
    for (int64_t i = 0; i < nb; i++)
        seen[tb[i]]++;
    for (int i = 0; i < 10; i++)
        CHECK(seen[i] == 1);
    size_t block_floats = KV_BLOCK_TOKENS * 2 * 8;
    for (int64_t l = 0; l < 3; l++)
        for (int32_t blk = 0; blk < 10; blk++) {
            float *k = kv_block_k(kv, l, blk), *v = kv_block_v(kv, l, blk);
            for (size_t i = 0; i < block_floats; i++) {
                k[i] = (float)(l * 1000 + blk * 10 + 1);
                v[i] = (float)(l * 1000 + blk * 10 + 2);
            }
        }
    for (int64_t l = 0; l < 3; l++)
        for (int32_t blk = 0; blk < 10; blk++) {
            CHECK(kv_block_k(kv, l, blk)[block_floats - 1] == (float)(l * 1000 + blk * 10 + 1));
            CHECK(kv_block_v(kv, l, blk)[0] == (float)(l * 1000 + blk * 10 + 2));
        }

    /* Stored length: set by the forward pass, reset by close. */
    CHECK(kv_seq_len(kv, a) == 0);
    kv_seq_set_len(kv, a, 17);
    CHECK(kv_seq_len(kv, a) == 17);
    CHECK(kv_seq_valid(kv, a) && !kv_seq_valid(kv, 3) && !kv_seq_valid(kv, -1) && !kv_seq_valid(kv, 4));
    CHECK(kv_max_seqs(kv) == 4);

    /* Close frees every block; ids are reused. */
    kv_seq_close(kv, b);
    CHECK(kv_free_blocks(kv) == 8);
    int c = kv_seq_open(kv, 0);
    CHECK(c == b);
    CHECK(kv_seq_capacity(kv, c) == 0 && kv_seq_len(kv, c) == 0);
    CHECK(kv_seq_open(kv, 0) >= 0 && kv_seq_open(kv, 0) >= 0);
    CHECK(kv_seq_open(kv, 0) == -1); /* max_seqs = 4 */
    kv_seq_close(kv, a);
    CHECK(kv_free_blocks(kv) == 10);
    kv_destroy(kv);
    kv_destroy(NULL);

    if (failures)
        fprintf(stderr, "%d checks failed\n", failures);
    else
        printf("kv_cache: all checks passed\n");
    return failures ? 1 : 0;
}
