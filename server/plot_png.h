/* plot_png.h: a small raster plotter that writes PNG files.
 *
 * Enough to draw benchmark figures without a plotting library: an RGB
 * canvas, lines, rectangles, text in a built-in 5x7 bitmap font (printable
 * ASCII, scalable by whole pixels, horizontal or rotated for y labels),
 * panels with linear or log10 axes, ticks, a legend, and series drawn as
 * lines and/or markers. PNG encoding uses zlib (compress2 for IDAT, crc32
 * for the chunk checksums). No global state: any thread may use its own
 * canvas. Colours are 0xRRGGBB.
 */
#ifndef INFERD_PLOT_PNG_H
#define INFERD_PLOT_PNG_H

#include <stddef.h>
#include <stdint.h>

struct plot_canvas;

/* Glyph cell of the built-in font at scale 1, spacing included. */
#define PLOT_GLYPH_W 6
#define PLOT_GLYPH_H 8

/* Series styles, bits. */
#define PLOT_LINES 1u   /* join consecutive points */
#define PLOT_MARKERS 2u /* a small filled square at each point */

struct plot_series {
    const char *label; /* legend text; NULL leaves the series out of the legend */
    const double *x, *y;
    size_t n;
    uint32_t rgb;
    unsigned style; /* PLOT_LINES | PLOT_MARKERS */
};

struct plot_axes {
    const char *title, *xlabel, *ylabel; /* each may be NULL */
    /* Data range; min >= max means fit to the data (linear axes start at 0
     * when all data are non-negative and the minimum is under half the
     * maximum, so bars of throughput read honestly). */
    double xmin, xmax, ymin, ymax;
    int log_x, log_y; /* log10 scale; points <= 0 are skipped */
};

/* A width x height canvas painted white; NULL when the size is outside
 * 1..16384 or memory runs out. The caller owns it: plot_destroy. */
struct plot_canvas *plot_create(int width, int height);
/* Frees c; NULL is fine. */
void plot_destroy(struct plot_canvas *c);
int plot_width(const struct plot_canvas *c);
int plot_height(const struct plot_canvas *c);
/* The colour at (x, y), or 0 outside the canvas. */
uint32_t plot_get(const struct plot_canvas *c, int x, int y);

/* Drawing: anything outside the canvas is clipped. */
void plot_line(struct plot_canvas *c, int x0, int y0, int x1, int y1, uint32_t rgb);
void plot_fill_rect(struct plot_canvas *c, int x, int y, int w, int h, uint32_t rgb);
/* Draws s with its top-left corner at (x, y); scale >= 1 enlarges each
 * font pixel; vertical != 0 rotates it a quarter turn anticlockwise
 * (reading bottom to top, starting at (x, y) as its bottom-left). Bytes
 * outside printable ASCII draw as '?'. */
void plot_text(struct plot_canvas *c, int x, int y, const char *s, uint32_t rgb, int scale,
               int vertical);
/* Width in pixels of s drawn at scale. */
int plot_text_width(const char *s, int scale);

/* Draws one chart in the rectangle (x, y, w, h) of c: frame, ticks with
 * labels, grid, title, axis labels, the series, and a legend at the top
 * right. Returns 0, or -1 when the rectangle is too small to hold it. */
int plot_panel(struct plot_canvas *c, int x, int y, int w, int h, const struct plot_axes *ax,
               const struct plot_series *s, size_t ns);

/* Encodes rgb (h rows of w pixels, 3 bytes each, top row first) as an
 * 8-bit RGB PNG in a malloc'ed buffer the caller frees. 0, or -1 on bad
 * arguments or out of memory. */
int plot_png_encode(const uint8_t *rgb, int w, int h, uint8_t **out, size_t *len);
/* Writes c to path as a PNG. 0, or -1 with the reason in err. */
int plot_write_png(const struct plot_canvas *c, const char *path, char *err, size_t errlen);

#endif
