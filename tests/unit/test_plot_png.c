/* test_plot_png.c: the plotter through plot_png.h. Draws a chart, writes
 * it, and reads the file back as a PNG decoder would: signature, chunk
 * order, every chunk's CRC, IHDR fields, and IDAT inflating to exactly
 * one filter byte plus w*3 bytes per row with the drawn pixels in place.
 * Argument: an optional output path (default: a file under /tmp). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "server/plot_png.h"

static int failures;

#define CHECK(cond)                                                              \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                          \
        }                                                                        \
    } while (0)

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = len > 0 ? malloc((size_t)len) : NULL;
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) {
        free(b);
        b = NULL;
    }
    fclose(f);
    *n = (size_t)len;
    return b;
}

/* Walks the PNG in buf; returns the inflated image data (caller frees). */
static uint8_t *check_png(const uint8_t *buf, size_t n, int w, int h)
{
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    CHECK(n > 8 && !memcmp(buf, sig, 8));
    size_t pos = 8;
    int k = 0, seen_iend = 0;
    uint8_t *idat = NULL;
    size_t idat_n = 0;
    while (pos + 12 <= n && !seen_iend) {
        uint32_t len = rd32(buf + pos);
        CHECK(pos + 12 + len <= n);
        if (pos + 12 + len > n)
            break;
        const uint8_t *type = buf + pos + 4;
        uLong crc = crc32(crc32(0L, Z_NULL, 0), type, 4 + len);
        CHECK(rd32(buf + pos + 8 + len) == (uint32_t)crc);
        if (k == 0) {
            CHECK(!memcmp(type, "IHDR", 4) && len == 13);
            CHECK(rd32(type + 4) == (uint32_t)w && rd32(type + 8) == (uint32_t)h);
            CHECK(type[12] == 8 && type[13] == 2 && type[14] == 0 && type[15] == 0 &&
                  type[16] == 0);
        }
        if (!memcmp(type, "IDAT", 4)) {
            uint8_t *m = realloc(idat, idat_n + len);
            CHECK(m != NULL);
            if (!m)
                break;
            idat = m;
            memcpy(idat + idat_n, type + 4, len);
            idat_n += len;
        }
        seen_iend = !memcmp(type, "IEND", 4);
        pos += 12 + len;
        k++;
    }
    CHECK(seen_iend && pos == n);
    uLongf raw_n = (uLongf)((size_t)h * ((size_t)w * 3 + 1));
    uint8_t *raw = malloc(raw_n + 16);
    uLongf got = raw_n + 16;
    CHECK(idat && raw && uncompress(raw, &got, idat, (uLong)idat_n) == Z_OK);
    CHECK(got == raw_n);
    free(idat);
    return raw;
}

static uint32_t raw_px(const uint8_t *raw, int w, int x, int y)
{
    const uint8_t *p = raw + (size_t)y * ((size_t)w * 3 + 1) + 1 + (size_t)x * 3;
    return (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
}

int main(int argc, char **argv)
{
    char tmp[] = "/tmp/test_plot_png_XXXXXX";
    const char *path = argc > 1 ? argv[1] : NULL;
    if (!path) {
        int fd = mkstemp(tmp);
        if (fd < 0) {
            perror("mkstemp");
            return 1;
        }
        close(fd);
        path = tmp;
    }

    /* Bad sizes are refused, not crashed on. */
    CHECK(plot_create(0, 10) == NULL);
    CHECK(plot_create(10, -1) == NULL);
    plot_destroy(NULL);

    const int W = 640, H = 480;
    struct plot_canvas *c = plot_create(W, H);
    CHECK(c != NULL);
    if (!c)
        return 1;
    CHECK(plot_width(c) == W && plot_height(c) == H);
    CHECK(plot_get(c, 5, 5) == 0xffffffu);

    /* Primitives land where they are asked to, and are clipped. */
    plot_fill_rect(c, 10, 10, 4, 3, 0x123456u);
    CHECK(plot_get(c, 10, 10) == 0x123456u && plot_get(c, 13, 12) == 0x123456u);
    CHECK(plot_get(c, 14, 10) == 0xffffffu && plot_get(c, 10, 13) == 0xffffffu);
    plot_line(c, -100, 20, 1000, 20, 0xff0000u);
    CHECK(plot_get(c, 0, 20) == 0xff0000u && plot_get(c, W - 1, 20) == 0xff0000u);
    plot_fill_rect(c, W - 2, H - 2, 50, 50, 0x00ff00u);
    CHECK(plot_get(c, W - 1, H - 1) == 0x00ff00u);
    CHECK(plot_text_width("p99", 2) == 3 * PLOT_GLYPH_W * 2);
    /* '1' has its stem in the middle column of the top row. */
    plot_text(c, 100, 100, "1", 0x0000ffu, 1, 0);
    CHECK(plot_get(c, 102, 100) == 0x0000ffu && plot_get(c, 100, 100) == 0xffffffu);

    /* A chart: two series on a linear panel, two on a log-log panel. */
    double x[20], y1[20], y2[20];
    for (int i = 0; i < 20; i++) {
        x[i] = 1 << (i % 10);
        y1[i] = 100.0 + 3.0 * i;
        y2[i] = 0.5 * (i + 1);
    }
    struct plot_series s[2] = {
        {.label = "TTFT p50", .x = x, .y = y1, .n = 10, .rgb = 0x1f77b4u, .style = PLOT_LINES | PLOT_MARKERS},
        {.label = "ITL p99", .x = x, .y = y2, .n = 10, .rgb = 0xd62728u, .style = PLOT_LINES},
    };
    struct plot_axes a = {.title = "latency", .xlabel = "concurrency", .ylabel = "ms"};
    CHECK(plot_panel(c, 0, 0, W, H / 2, &a, s, 2) == 0);
    a.log_x = a.log_y = 1;
    CHECK(plot_panel(c, 0, H / 2, W, H / 2, &a, s, 2) == 0);
    CHECK(plot_panel(c, 0, 0, 20, 20, &a, s, 2) == -1);
    /* Somewhere in the upper panel the first series' colour was drawn. */
    int found = 0;
    for (int yy = 0; yy < H / 2 && !found; yy++)
        for (int xx = 0; xx < W && !found; xx++)
            found = plot_get(c, xx, yy) == 0x1f77b4u;
    CHECK(found);

    char err[256];
    CHECK(plot_write_png(c, path, err, sizeof(err)) == 0);
    size_t n = 0;
    uint8_t *buf = slurp(path, &n);
    CHECK(buf != NULL);
    if (buf) {
        uint8_t *raw = check_png(buf, n, W, H);
        if (raw) {
            for (int yy = 0; yy < H; yy++)
                CHECK(raw[(size_t)yy * ((size_t)W * 3 + 1)] == 0);
            CHECK(raw_px(raw, W, 10, 10) == 0x123456u);
            CHECK(raw_px(raw, W, W - 1, H - 1) == 0x00ff00u);
            CHECK(raw_px(raw, W, 5, 5) == 0xffffffu);
        }
        free(raw);
    }
    free(buf);
    CHECK(plot_write_png(c, "/nonexistent-dir/x.png", err, sizeof(err)) == -1 && err[0]);

    /* The encoder on its own, 1x1. */
    uint8_t px[3] = {1, 2, 3}, *png = NULL;
    size_t png_n = 0;
    CHECK(plot_png_encode(px, 1, 1, &png, &png_n) == 0);
    uint8_t *raw1 = png ? check_png(png, png_n, 1, 1) : NULL;
    CHECK(raw1 && raw1[0] == 0 && raw1[1] == 1 && raw1[2] == 2 && raw1[3] == 3);
    free(raw1);
    free(png);
    CHECK(plot_png_encode(px, 0, 1, &png, &png_n) == -1);

    plot_destroy(c);
    if (argc <= 1)
        unlink(tmp);
    if (failures) {
        fprintf(stderr, "test_plot_png: %d failures\n", failures);
        return 1;
    }
    puts("test_plot_png: ok");
    return 0;
}
