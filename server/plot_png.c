/* plot_png.c: the raster plotter behind `inferd bench serve --plot` (see
 * plot_png.h): an RGB canvas, Bresenham lines, a 5x7 bitmap font, chart
 * panels with nice-number ticks, and a PNG encoder on zlib. Runs on the
 * caller's thread; holds no state beyond the canvas. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "server/plot_png.h"

struct plot_canvas {
    int w, h;
    uint8_t *px; /* (h, w, 3) RGB, top row first */
    /* Drawing clip, [cx0, cx1) x [cy0, cy1): the panel's plot area while
     * series are drawn, so lines leave it cleanly. */
    int cx0, cy0, cx1, cy1;
};

/* ---- canvas ---------------------------------------------------------- */

struct plot_canvas *plot_create(int width, int height)
{
    if (width < 1 || height < 1 || width > 16384 || height > 16384)
        return NULL;
    struct plot_canvas *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->px = malloc((size_t)width * (size_t)height * 3);
    if (!c->px) {
        free(c);
        return NULL;
    }
    memset(c->px, 0xff, (size_t)width * (size_t)height * 3);
    c->w = width;
    c->h = height;
    c->cx1 = width;
    c->cy1 = height;
    return c;
}

void plot_destroy(struct plot_canvas *c)
{
    if (!c)
        return;
    free(c->px);
    free(c);
}

int plot_width(const struct plot_canvas *c) { return c->w; }
int plot_height(const struct plot_canvas *c) { return c->h; }

uint32_t plot_get(const struct plot_canvas *c, int x, int y)
{
    if (x < 0 || y < 0 || x >= c->w || y >= c->h)
        return 0;
    const uint8_t *p = c->px + ((size_t)y * (size_t)c->w + (size_t)x) * 3;
    return (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
}

static void put(struct plot_canvas *c, int x, int y, uint32_t rgb)
{
    if (x < c->cx0 || y < c->cy0 || x >= c->cx1 || y >= c->cy1)
        return;
    uint8_t *p = c->px + ((size_t)y * (size_t)c->w + (size_t)x) * 3;
    p[0] = (uint8_t)(rgb >> 16);
    p[1] = (uint8_t)(rgb >> 8);
    p[2] = (uint8_t)rgb;
}

static void set_clip(struct plot_canvas *c, int x0, int y0, int x1, int y1)
{
    c->cx0 = x0 < 0 ? 0 : x0;
    c->cy0 = y0 < 0 ? 0 : y0;
    c->cx1 = x1 > c->w ? c->w : x1;
    c->cy1 = y1 > c->h ? c->h : y1;
}

void plot_line(struct plot_canvas *c, int x0, int y0, int x1, int y1, uint32_t rgb)
{
    /* Bresenham; endpoints far off the canvas (a log axis fed a tiny
     * value) are bounded first so the loop stays short. */
    const int lim = 1 << 15;
    x0 = x0 < -lim ? -lim : x0 > lim ? lim : x0;
    x1 = x1 < -lim ? -lim : x1 > lim ? lim : x1;
    y0 = y0 < -lim ? -lim : y0 > lim ? lim : y0;
    y1 = y1 < -lim ? -lim : y1 > lim ? lim : y1;
    int dx = abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
    int dy = -abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
        put(c, x0, y0, rgb);
        if (x0 == x1 && y0 == y1)
            break;
        int e2 = 2 * err;
        if (e2 >= dy) {
            err += dy;
            x0 += sx;
        }
        if (e2 <= dx) {
            err += dx;
            y0 += sy;
        }
    }
}

void plot_fill_rect(struct plot_canvas *c, int x, int y, int w, int h, uint32_t rgb)
{
    for (int j = y; j < y + h; j++)
        for (int i = x; i < x + w; i++)
            put(c, i, j, rgb);
}

/* ---- text ------------------------------------------------------------ */

/* Printable ASCII 32..126, 7 rows each, bit 4 the leftmost column. */
static const uint8_t font5x7[95][7] = {
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}, /*   */
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04}, /* ! */
    {0x0a, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00}, /* " */
    {0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a}, /* # */
    {0x04, 0x0f, 0x14, 0x0e, 0x05, 0x1e, 0x04}, /* $ */
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}, /* % */
    {0x0c, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0d}, /* & */
    {0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00}, /* ' */
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}, /* ( */
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}, /* ) */
    {0x00, 0x04, 0x15, 0x0e, 0x15, 0x04, 0x00}, /* * */
    {0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00}, /* + */
    {0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08}, /* , */
    {0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00}, /* - */
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c}, /* . */
    {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}, /* / */
    {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e}, /* 0 */
    {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e}, /* 1 */
    {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f}, /* 2 */
    {0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e}, /* 3 */
    {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02}, /* 4 */
    {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e}, /* 5 */
    {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e}, /* 6 */
    {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}, /* 7 */
    {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e}, /* 8 */
    {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c}, /* 9 */
    {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00}, /* : */
    {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x04, 0x08}, /* ; */
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02}, /* < */
    {0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00}, /* = */
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08}, /* > */
    {0x0e, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04}, /* ? */
    {0x0e, 0x11, 0x01, 0x0d, 0x15, 0x15, 0x0e}, /* @ */
    {0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11}, /* A */
    {0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e}, /* B */
    {0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e}, /* C */
    {0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c}, /* D */
    {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f}, /* E */
    {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10}, /* F */
    {0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f}, /* G */
    {0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11}, /* H */
    {0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}, /* I */
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c}, /* J */
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}, /* K */
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f}, /* L */
    {0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11}, /* M */
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}, /* N */
    {0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}, /* O */
    {0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10}, /* P */
    {0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d}, /* Q */
    {0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11}, /* R */
    {0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e}, /* S */
    {0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}, /* T */
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}, /* U */
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04}, /* V */
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a}, /* W */
    {0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11}, /* X */
    {0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04}, /* Y */
    {0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f}, /* Z */
    {0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e}, /* [ */
    {0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00}, /* backslash */
    {0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e}, /* ] */
    {0x04, 0x0a, 0x11, 0x00, 0x00, 0x00, 0x00}, /* ^ */
    {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f}, /* _ */
    {0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00}, /* ` */
    {0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f}, /* a */
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e}, /* b */
    {0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e}, /* c */
    {0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f}, /* d */
    {0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e}, /* e */
    {0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08}, /* f */
    {0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e}, /* g */
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11}, /* h */
    {0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e}, /* i */
    {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c}, /* j */
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12}, /* k */
    {0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}, /* l */
    {0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11}, /* m */
    {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}, /* n */
    {0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e}, /* o */
    {0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10}, /* p */
    {0x00, 0x00, 0x0d, 0x13, 0x0f, 0x01, 0x01}, /* q */
    {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}, /* r */
    {0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e}, /* s */
    {0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06}, /* t */
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d}, /* u */
    {0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04}, /* v */
    {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a}, /* w */
    {0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11}, /* x */
    {0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e}, /* y */
    {0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f}, /* z */
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02}, /* { */
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}, /* | */
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08}, /* } */
    {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00}, /* ~ */
};

int plot_text_width(const char *s, int scale)
{
    return (int)strlen(s) * PLOT_GLYPH_W * (scale < 1 ? 1 : scale);
}

void plot_text(struct plot_canvas *c, int x, int y, const char *s, uint32_t rgb, int scale,
               int vertical)
{
    if (scale < 1)
        scale = 1;
    for (int k = 0; s[k]; k++) {
        unsigned ch = (unsigned char)s[k];
        const uint8_t *g = font5x7[(ch < 32 || ch > 126 ? '?' : ch) - 32];
        for (int r = 0; r < 7; r++)
            for (int col = 0; col < 5; col++) {
                if (!(g[r] >> (4 - col) & 1))
                    continue;
                int gx = k * PLOT_GLYPH_W + col, gy = r;
                /* Rotated: the glyph's x runs up the canvas, its y right. */
                int px = vertical ? x + gy * scale : x + gx * scale;
                int py = vertical ? y - (gx + 1) * scale + 1 : y + gy * scale;
                plot_fill_rect(c, px, py, scale, scale, rgb);
            }
    }
}

/* ---- axes ------------------------------------------------------------ */

/* 1, 2 or 5 times a power of ten, near range / target. */
static double nice_step(double range, int target)
{
    double raw = range / target;
    double p = pow(10.0, floor(log10(raw)));
    double f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

struct axis {
    double lo, hi; /* in axis units: log10 of the data on a log axis */
    double step;   /* linear tick step */
    int log;
    int p0, p1; /* pixel positions of lo and hi */
};

static double ax_map(const struct axis *a, double v)
{
    double u = a->log ? log10(v) : v;
    return a->p0 + (u - a->lo) / (a->hi - a->lo) * (a->p1 - a->p0);
}

/* Fits an axis to [mn, mx] (or to the series' values when mn >= mx). */
static void ax_fit(struct axis *a, double mn, double mx, int log, const struct plot_series *s,
                   size_t ns, int use_y)
{
    a->log = log;
    int fitted = !(mn < mx);
    if (fitted) {
        mn = INFINITY;
        mx = -INFINITY;
        for (size_t i = 0; i < ns; i++)
            for (size_t k = 0; k < s[i].n; k++) {
                double v = use_y ? s[i].y[k] : s[i].x[k];
                if (!isfinite(v) || (log && v <= 0))
                    continue;
                mn = v < mn ? v : mn;
                mx = v > mx ? v : mx;
            }
        if (!(mn <= mx)) { /* no data */
            mn = log ? 1 : 0;
            mx = log ? 10 : 1;
        }
        if (!log && mn >= 0 && mn < 0.5 * mx)
            mn = 0;
        /* Headroom above the data on a fitted y axis: the legend sits there. */
        if (use_y && mx > mn)
            mx += (log ? 0 : 0.12) * (mx - mn);
    }
    if (log) {
        a->lo = floor(log10(mn));
        a->hi = ceil(log10(mx));
        if (a->hi <= a->lo)
            a->hi = a->lo + 1;
        a->step = 1;
        return;
    }
    if (mx - mn < 1e-12 * (fabs(mx) + 1e-300) || mx == mn) {
        double pad = mn == 0 ? 1 : fabs(mn) * 0.1;
        mn -= pad;
        mx += pad;
    }
    a->step = nice_step(mx - mn, 5);
    a->lo = floor(mn / a->step + 1e-9) * a->step;
    a->hi = ceil(mx / a->step - 1e-9) * a->step;
    if (fitted && a->hi - mx < 0.02 * (a->hi - a->lo))
        a->hi += a->step; /* a point on the frame would hide in it */
}

static void tick_label(const struct axis *a, double u, char *buf, size_t n)
{
    if (a->log) {
        snprintf(buf, n, "%g", pow(10.0, u));
        return;
    }
    int dec = a->step >= 1 ? 0 : (int)ceil(-log10(a->step) - 1e-9);
    if (fabs(u) < a->step * 1e-6)
        u = 0; /* no "-0" */
    snprintf(buf, n, "%.*f", dec, u);
}

#define INK 0x202020u
#define GRID 0xe4e4e4u

int plot_panel(struct plot_canvas *c, int x, int y, int w, int h, const struct plot_axes *ax,
               const struct plot_series *s, size_t ns)
{
    /* Margins: tick labels and the rotated y label on the left, tick
     * labels and the x label below, the title above. */
    const int ml = 74, mr = 14, mt = 26, mb = 40;
    int X0 = x + ml, X1 = x + w - mr, Y0 = y + mt, Y1 = y + h - mb;
    if (X1 - X0 < 40 || Y1 - Y0 < 30)
        return -1;
    struct axis xa = {.p0 = X0, .p1 = X1}, ya = {.p0 = Y1, .p1 = Y0};
    ax_fit(&xa, ax->xmin, ax->xmax, ax->log_x, s, ns, 0);
    ax_fit(&ya, ax->ymin, ax->ymax, ax->log_y, s, ns, 1);
    char buf[64];

    /* Grid and ticks. A log axis also gets unlabelled 2..9 minor ticks. */
    for (int pass = 0; pass < 2; pass++) {
        const struct axis *a = pass ? &ya : &xa;
        int n = (int)floor((a->hi - a->lo) / a->step + 0.5);
        if (n > 1000)
            n = 1000;
        for (int i = 0; i <= n; i++) {
            double u = a->lo + i * a->step;
            int p = (int)lround(a->p0 + (u - a->lo) / (a->hi - a->lo) * (a->p1 - a->p0));
            tick_label(a, u, buf, sizeof(buf));
            int tw = plot_text_width(buf, 1);
            if (!pass) {
                plot_line(c, p, Y0, p, Y1, GRID);
                plot_line(c, p, Y1, p, Y1 + 4, INK);
                plot_text(c, p - tw / 2, Y1 + 7, buf, INK, 1, 0);
            } else {
                plot_line(c, X0, p, X1, p, GRID);
                plot_line(c, X0 - 4, p, X0, p, INK);
                plot_text(c, X0 - 7 - tw, p - 3, buf, INK, 1, 0);
            }
            for (int m = 2; a->log && i < n && m <= 9; m++) {
                double um = u + log10((double)m);
                int q = (int)lround(a->p0 + (um - a->lo) / (a->hi - a->lo) * (a->p1 - a->p0));
                /* Over a few decades, 2 and 5 are labelled too. */
                int lab = (m == 2 || m == 5) && a->hi - a->lo <= 3;
                if (lab)
                    snprintf(buf, sizeof(buf), "%g", pow(10.0, um));
                if (!pass) {
                    plot_line(c, q, Y1, q, Y1 + (lab ? 4 : 2), INK);
                    if (lab)
                        plot_text(c, q - plot_text_width(buf, 1) / 2, Y1 + 7, buf, INK, 1, 0);
                } else {
                    plot_line(c, X0 - (lab ? 4 : 2), q, X0, q, INK);
                    if (lab)
                        plot_text(c, X0 - 7 - plot_text_width(buf, 1), q - 3, buf, INK, 1, 0);
                }
            }
        }
    }
    plot_line(c, X0, Y0, X1, Y0, INK);
    plot_line(c, X0, Y1, X1, Y1, INK);
    plot_line(c, X0, Y0, X0, Y1, INK);
    plot_line(c, X1, Y0, X1, Y1, INK);
    if (ax->title)
        plot_text(c, (X0 + X1) / 2 - plot_text_width(ax->title, 2) / 2, y + 6, ax->title, INK, 2, 0);
    if (ax->xlabel)
        plot_text(c, (X0 + X1) / 2 - plot_text_width(ax->xlabel, 1) / 2, Y1 + 22, ax->xlabel,
                  INK, 1, 0);
    if (ax->ylabel)
        plot_text(c, x + 6, (Y0 + Y1) / 2 + plot_text_width(ax->ylabel, 1) / 2, ax->ylabel,
                  INK, 1, 1);

    /* Series, clipped to the plot area. */
    set_clip(c, X0 + 1, Y0 + 1, X1, Y1);
    for (size_t i = 0; i < ns; i++) {
        int have_prev = 0, px = 0, py = 0;
        for (size_t k = 0; k < s[i].n; k++) {
            double vx = s[i].x[k], vy = s[i].y[k];
            if (!isfinite(vx) || !isfinite(vy) || (xa.log && vx <= 0) || (ya.log && vy <= 0)) {
                have_prev = 0;
                continue;
            }
            int qx = (int)lround(fmax(-1e6, fmin(1e6, ax_map(&xa, vx))));
            int qy = (int)lround(fmax(-1e6, fmin(1e6, ax_map(&ya, vy))));
            if ((s[i].style & PLOT_LINES) && have_prev) {
                /* Two pixels wide so thin lines survive downscaling. */
                plot_line(c, px, py, qx, qy, s[i].rgb);
                plot_line(c, px, py + 1, qx, qy + 1, s[i].rgb);
            }
            if (s[i].style & PLOT_MARKERS)
                plot_fill_rect(c, qx - 2, qy - 2, 5, 5, s[i].rgb);
            have_prev = 1;
            px = qx;
            py = qy;
        }
    }
    set_clip(c, 0, 0, c->w, c->h);

    /* Legend: a framed box at the top right of the plot area. */
    int nl = 0, lw = 0;
    for (size_t i = 0; i < ns; i++)
        if (s[i].label) {
            nl++;
            int tw = plot_text_width(s[i].label, 1);
            lw = tw > lw ? tw : lw;
        }
    if (nl) {
        int bw = lw + 34, bh = nl * 12 + 8, bx = X1 - bw - 6, by = Y0 + 6;
        plot_fill_rect(c, bx, by, bw, bh, 0xffffffu);
        plot_line(c, bx, by, bx + bw, by, 0xa0a0a0u);
        plot_line(c, bx, by + bh, bx + bw, by + bh, 0xa0a0a0u);
        plot_line(c, bx, by, bx, by + bh, 0xa0a0a0u);
        plot_line(c, bx + bw, by, bx + bw, by + bh, 0xa0a0a0u);
        int row = 0;
        for (size_t i = 0; i < ns; i++) {
            if (!s[i].label)
                continue;
            int ly = by + 6 + row * 12;
            if (s[i].style & PLOT_LINES)
                plot_fill_rect(c, bx + 6, ly + 2, 18, 2, s[i].rgb);
            if (s[i].style & PLOT_MARKERS)
                plot_fill_rect(c, bx + 13, ly + 1, 5, 5, s[i].rgb);
            plot_text(c, bx + 28, ly, s[i].label, INK, 1, 0);
            row++;
        }
    }
    return 0;
}

/* ---- PNG ------------------------------------------------------------- */

static void be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Appends a chunk at *pos: length, type, data, CRC of type + data. */
static void put_chunk(uint8_t *out, size_t *pos, const char type[4], const uint8_t *data,
                      uint32_t n)
{
    uint8_t *p = out + *pos;
    be32(p, n);
    memcpy(p + 4, type, 4);
    if (n)
        memcpy(p + 8, data, n);
    uLong crc = crc32(0L, Z_NULL, 0);
    crc = crc32(crc, p + 4, 4 + n);
    be32(p + 8 + n, (uint32_t)crc);
    *pos += 12 + (size_t)n;
}

int plot_png_encode(const uint8_t *rgb, int w, int h, uint8_t **out, size_t *len)
{
    if (!rgb || w < 1 || h < 1 || w > 16384 || h > 16384)
        return -1;
    size_t stride = (size_t)w * 3 + 1;
    size_t raw_n = stride * (size_t)h;
    uint8_t *raw = malloc(raw_n);
    uLongf z_n = compressBound((uLong)raw_n);
    uint8_t *z = malloc(z_n);
    uint8_t *png = NULL;
    if (!raw || !z)
        goto fail;
    /* Filter type 0 (none) on every row: plots are mostly flat colour,
     * which deflate already squeezes well. */
    for (int r = 0; r < h; r++) {
        raw[(size_t)r * stride] = 0;
        memcpy(raw + (size_t)r * stride + 1, rgb + (size_t)r * (size_t)w * 3, (size_t)w * 3);
    }
    if (compress2(z, &z_n, raw, (uLong)raw_n, 9) != Z_OK || z_n > 0x7fffffffu)
        goto fail;
    size_t total = 8 + (12 + 13) + (12 + (size_t)z_n) + 12;
    png = malloc(total);
    if (!png)
        goto fail;
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    memcpy(png, sig, 8);
    size_t pos = 8;
    uint8_t ihdr[13];
    be32(ihdr, (uint32_t)w);
    be32(ihdr + 4, (uint32_t)h);
    ihdr[8] = 8;  /* bit depth */
    ihdr[9] = 2;  /* colour type: RGB */
    ihdr[10] = 0; /* deflate */
    ihdr[11] = 0; /* adaptive filtering */
    ihdr[12] = 0; /* no interlace */
    put_chunk(png, &pos, "IHDR", ihdr, 13);
    put_chunk(png, &pos, "IDAT", z, (uint32_t)z_n);
    put_chunk(png, &pos, "IEND", NULL, 0);
    free(raw);
    free(z);
    *out = png;
    *len = pos;
    return 0;
fail:
    free(raw);
    free(z);
    free(png);
    return -1;
}

int plot_write_png(const struct plot_canvas *c, const char *path, char *err, size_t errlen)
{
    uint8_t *png;
    size_t n;
    if (plot_png_encode(c->px, c->w, c->h, &png, &n)) {
        snprintf(err, errlen, "%s: cannot encode the PNG (out of memory)", path);
        return -1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        free(png);
        return -1;
    }
    size_t wr = fwrite(png, 1, n, f);
    int bad = wr != n;
    bad |= fclose(f) != 0;
    free(png);
    if (bad) {
        snprintf(err, errlen, "%s: write failed", path);
        return -1;
    }
    return 0;
}
