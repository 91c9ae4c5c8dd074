/* ANNa's per-cell preprocessing kernel: read a cell image, find the cell, crop, resize, mask.
 *
 * Compiled on first use by modules/native.py (C99 + POSIX + one GCC/Clang attribute, no Python headers) and called
 * through ctypes, which releases the GIL, so threads prepare cells truly in parallel. It does
 * exactly what modules/preprocess.py's NumPy reference does (`_crop_resize_numpy`, `taps`), in
 * integer arithmetic only, so both give the same bytes on every machine; tests compare them.
 *
 * Geometry (as preprocess.cell_square): the cell is every pixel with a channel above
 * `threshold`; its bounding box (y, x, h, w) is kept with `margin` pixels around it in a square of
 * side max(max(w, h) + 2 margin, canvas) centred on the box; the part of the square inside the
 * image is resampled to its place in the size x size output, the rest stays black.
 *
 * Resampling, per axis (vertical pass first, then horizontal): shrinking averages the input
 * pixels each output pixel covers, weighted by overlap (area resampling); enlarging is bilinear
 * with pixel centres aligned. Tap weights are integers summing to 256 on each axis.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ANNA_KERNEL_VERSION 1
#define ONE 256 /* sum of the tap weights of one output pixel on one axis */

/* Status of one cell (anna_prepare_files) or call. */
#define ANNA_OK 0
#define ANNA_NOT_BMP24 1 /* not an uncompressed 24-bit BMP, or truncated: the caller decodes it */
#define ANNA_NO_CELL 2   /* every channel <= threshold */
#define ANNA_TOO_LARGE 3 /* image too large for this kernel */
/* negative: -errno of a failed open/read/allocation */

int anna_kernel_version(void) { return ANNA_KERNEL_VERSION; }

/* Largest number of taps an output pixel can have when resampling n_in pixels to n_out. */
static int64_t max_taps(int64_t n_in, int64_t n_out) { return n_in > n_out ? (n_in + n_out - 1) / n_out + 1 : 2; }

/* Tap table of one axis: output d reads inputs first[d] .. first[d] + count[d] - 1 with
 * weights weight[d * stride + t]; returns the table's stride (max_taps). */
int64_t anna_taps(int64_t n_in, int64_t n_out, int32_t *first, int32_t *count, int32_t *weight)
{
    if (n_in < 1 || n_out < 1) return -EINVAL;
    int64_t stride = max_taps(n_in, n_out);
    memset(weight, 0, (size_t)(n_out * stride) * sizeof *weight);
    if (n_in >= n_out) { /* area: output d covers [d n_in, (d+1) n_in) in units of 1/n_out pixel */
        /* rounded[c] = (c ONE + n_in / 2) / n_in for c = 0 .. n_in, without a division per entry;
         * weights are differences of it (cumulative rounding: they sum to exactly ONE, none < 0). */
        int32_t stack[1024], *rounded = n_in < 1024 ? stack : malloc((size_t)(n_in + 1) * sizeof *rounded);
        if (!rounded) return -ENOMEM;
        int64_t quotient = 0, remainder = n_in / 2;
        for (int64_t c = 0; c <= n_in; c++) {
            rounded[c] = (int32_t)quotient;
            remainder += ONE;
            while (remainder >= n_in) {
                remainder -= n_in;
                quotient++;
            }
        }
        int64_t s0 = 0, low = 0;
        for (int64_t d = 0; d < n_out; d++, low += n_in) {
            int64_t high = low + n_in, t = 0;
            while ((s0 + 1) * n_out <= low) s0++;
            for (int64_t s = s0; s * n_out < high; s++, t++) {
                int64_t begin = (s * n_out > low ? s * n_out : low) - low;
                int64_t end = ((s + 1) * n_out < high ? (s + 1) * n_out : high) - low;
                weight[d * stride + t] = rounded[end] - rounded[begin];
            }
            first[d] = (int32_t)s0;
            count[d] = (int32_t)t;
        }
        if (rounded != stack) free(rounded);
        return stride;
    }
    for (int64_t d = 0; d < n_out; d++) { /* bilinear: source position ((2d + 1) n_in - n_out) / (2 n_out) */
        int32_t *w = weight + d * stride;
        int64_t num = (2 * d + 1) * n_in - n_out, den = 2 * n_out;
        int64_t s = num < 0 ? 0 : num / den, frac = num < 0 ? 0 : num % den;
        if (s >= n_in - 1) {
            first[d] = (int32_t)(n_in - 1);
            count[d] = 1;
            w[0] = ONE;
        } else {
            int32_t w1 = (int32_t)((frac * ONE + n_out) / den); /* round half up */
            first[d] = (int32_t)s;
            count[d] = 2;
            w[0] = ONE - w1;
            w[1] = w1;
        }
    }
    return stride;
}

/* Bounding box of the pixels with a channel above threshold, from one pass of row maxima (the
 * rows) and column maxima (the columns). */
typedef struct {
    int64_t first, last, n; /* first and last row with a cell pixel (-1: none yet); bytes per row */
    uint8_t *colmax;        /* n column (byte) maxima */
} BoxScan;

static void scan_rows(BoxScan *scan, const uint8_t *row, int64_t rows, int64_t row_step, int threshold)
{
    for (int64_t r = 0; r < rows; r++, row += row_step) {
        uint8_t m = 0, *colmax = scan->colmax;
        for (int64_t i = 0; i < scan->n; i++) { /* vectorized by the compiler */
            uint8_t v = row[i];
            m = v > m ? v : m;
            colmax[i] = v > colmax[i] ? v : colmax[i];
        }
        if (m > threshold) {
            if (scan->first < 0) scan->first = r;
            scan->last = r;
        }
    }
}

/* box = (y, x, height, width) from the scan; flip: rows were scanned bottom-up, `rows` of them. */
static int finish_box(const BoxScan *scan, int threshold, int flip, int64_t rows, int64_t box[4])
{
    if (scan->first < 0) return ANNA_NO_CELL;
    int64_t left = 0, right = scan->n - 1;
    while (scan->colmax[left] <= threshold) left++;
    while (scan->colmax[right] <= threshold) right--;
    box[0] = flip ? rows - 1 - scan->last : scan->first;
    box[1] = left / 3;
    box[2] = scan->last - scan->first + 1;
    box[3] = right / 3 - left / 3 + 1;
    return ANNA_OK;
}

static int64_t round_ratio(int64_t num, int64_t den) { return (2 * num + den) / (2 * den); } /* num >= 0 */

static int crop_resize_box(const uint8_t *image, int64_t rows, int64_t cols, int64_t row_step, const int64_t box[4],
                           int64_t size, int64_t margin, int threshold, int64_t canvas, int swap, uint8_t *out,
                           uint8_t *mask);

static int too_large(int64_t rows, int64_t cols, int64_t size)
{
    return rows < 1 || cols < 1 || size < 1 || rows > (1 << 20) || cols > (1 << 20) || size > (1 << 14);
}

/* Crop, resample and mask one image (3 channels, pixel-contiguous rows `row_step` bytes apart,
 * negative for bottom-up storage) into out (size x size x 3, channels reversed when swap) and
 * mask (size x size, 1 on the cell). out and mask must be zero-filled: only the part of the
 * square that lies inside the image is written (the rest is black padding). */
int anna_crop_resize(const uint8_t *image, int64_t rows, int64_t cols, int64_t row_step, int64_t size,
                     int64_t margin, int threshold, int64_t canvas, int swap, uint8_t *out, uint8_t *mask)
{
    if (too_large(rows, cols, size)) return ANNA_TOO_LARGE;
    BoxScan scan = {-1, -1, cols * 3, calloc((size_t)(cols * 3), 1)};
    if (!scan.colmax) return -ENOMEM;
    scan_rows(&scan, image, rows, row_step, threshold);
    int64_t box[4];
    int status = finish_box(&scan, threshold, 0, rows, box);
    free(scan.colmax);
    if (status != ANNA_OK) return status;
    return crop_resize_box(image, rows, cols, row_step, box, size, margin, threshold, canvas, swap, out, mask);
}

/* Vertical pass of one output row: acc = weighted sum of `taps` input rows (at most 255 * 256,
 * so 16 bits hold it). The usual 2 and 3 taps are unrolled: one pass over acc instead of one per tap. */
static void vertical(const uint8_t *src, int64_t row_step, const int32_t *w, int32_t taps, int64_t n, uint16_t *acc)
{
    const uint8_t *r0 = src;
    uint16_t w0 = (uint16_t)w[0];
    if (taps == 2) {
        const uint8_t *r1 = src + row_step;
        uint16_t w1 = (uint16_t)w[1];
        for (int64_t i = 0; i < n; i++) acc[i] = (uint16_t)(w0 * r0[i] + w1 * r1[i]);
        return;
    }
    if (taps == 3) {
        const uint8_t *r1 = src + row_step, *r2 = src + 2 * row_step;
        uint16_t w1 = (uint16_t)w[1], w2 = (uint16_t)w[2];
        for (int64_t i = 0; i < n; i++) acc[i] = (uint16_t)(w0 * r0[i] + w1 * r1[i] + w2 * r2[i]);
        return;
    }
    for (int64_t i = 0; i < n; i++) acc[i] = (uint16_t)(w0 * r0[i]);
    for (int32_t t = 1; t < taps; t++) {
        const uint8_t *row = src + t * row_step;
        uint16_t wt = (uint16_t)w[t];
        for (int64_t i = 0; i < n; i++) acc[i] = (uint16_t)(acc[i] + wt * row[i]);
    }
}

/* Horizontal pass of one output row: weighted sums of acc's pixels, rounded half up to 8 bits,
 * written with channels reversed when swap (a constant at each call: the compiler specializes). */
static inline __attribute__((always_inline)) void horizontal(const uint16_t *acc, const int32_t *first,
                                                              const int32_t *count, const int32_t *weight,
                                                              int64_t stride, int64_t out_cols, int threshold,
                                                              const int swap, uint8_t *dst, uint8_t *dmask)
{
    for (int64_t ox = 0; ox < out_cols; ox++, dst += 3) {
        const int32_t *wh = weight + ox * stride;
        const uint16_t *a = acc + first[ox] * 3;
        uint32_t s0 = 1u << 15, s1 = 1u << 15, s2 = 1u << 15;
        int32_t taps = count[ox];
        if (taps == 2) { /* the usual counts, unrolled */
            uint32_t w0 = (uint32_t)wh[0], w1 = (uint32_t)wh[1];
            s0 += w0 * a[0] + w1 * a[3];
            s1 += w0 * a[1] + w1 * a[4];
            s2 += w0 * a[2] + w1 * a[5];
        } else if (taps == 3) {
            uint32_t w0 = (uint32_t)wh[0], w1 = (uint32_t)wh[1], w2 = (uint32_t)wh[2];
            s0 += w0 * a[0] + w1 * a[3] + w2 * a[6];
            s1 += w0 * a[1] + w1 * a[4] + w2 * a[7];
            s2 += w0 * a[2] + w1 * a[5] + w2 * a[8];
        } else {
            for (int32_t t = 0; t < taps; t++, a += 3) {
                s0 += (uint32_t)wh[t] * a[0];
                s1 += (uint32_t)wh[t] * a[1];
                s2 += (uint32_t)wh[t] * a[2];
            }
        }
        uint8_t v0 = (uint8_t)(s0 >> 16), v1 = (uint8_t)(s1 >> 16), v2 = (uint8_t)(s2 >> 16);
        dst[swap ? 2 : 0] = v0;
        dst[1] = v1;
        dst[swap ? 0 : 2] = v2;
        uint8_t peak = v0 > v1 ? v0 : v1;
        dmask[ox] = (peak > v2 ? peak : v2) > threshold;
    }
}

static int crop_resize_box(const uint8_t *image, int64_t rows, int64_t cols, int64_t row_step, const int64_t box[4],
                           int64_t size, int64_t margin, int threshold, int64_t canvas, int swap, uint8_t *out,
                           uint8_t *mask)
{
    int64_t y = box[0], x = box[1], h = box[2], w = box[3];
    int64_t side = (w > h ? w : h) + 2 * margin;
    if (side < canvas) side = canvas;
    int64_t top = y + h / 2 - side / 2, left = x + w / 2 - side / 2;
    int64_t y0 = y - margin, y1 = y + h + margin, x0 = x - margin, x1 = x + w + margin;
    if (y0 < 0) y0 = 0;
    if (y0 < top) y0 = top;
    if (y1 > rows) y1 = rows;
    if (y1 > top + side) y1 = top + side;
    if (x0 < 0) x0 = 0;
    if (x0 < left) x0 = left;
    if (x1 > cols) x1 = cols;
    if (x1 > left + side) x1 = left + side;
    int64_t oy0 = round_ratio((y0 - top) * size, side), oy1 = round_ratio((y1 - top) * size, side);
    int64_t ox0 = round_ratio((x0 - left) * size, side), ox1 = round_ratio((x1 - left) * size, side);
    if (oy1 <= oy0 || ox1 <= ox0) return ANNA_OK;

    int64_t in_rows = y1 - y0, in_cols = x1 - x0, out_rows = oy1 - oy0, out_cols = ox1 - ox0;
    int64_t vt = max_taps(in_rows, out_rows), ht = max_taps(in_cols, out_cols), n = in_cols * 3;
    int32_t *tables = malloc((size_t)(out_rows * (2 + vt) + out_cols * (2 + ht)) * sizeof *tables);
    uint16_t *acc = malloc((size_t)n * sizeof *acc);
    if (!tables || !acc) {
        free(tables);
        free(acc);
        return -ENOMEM;
    }
    int32_t *vfirst = tables, *vcount = vfirst + out_rows, *vweight = vcount + out_rows;
    int32_t *hfirst = vweight + out_rows * vt, *hcount = hfirst + out_cols, *hweight = hcount + out_cols;
    if (anna_taps(in_rows, out_rows, vfirst, vcount, vweight) < 0 || anna_taps(in_cols, out_cols, hfirst, hcount, hweight) < 0) {
        free(tables);
        free(acc);
        return -ENOMEM;
    }
    const uint8_t *corner = image + y0 * row_step + x0 * 3;
    for (int64_t oy = 0; oy < out_rows; oy++) {
        vertical(corner + vfirst[oy] * row_step, row_step, vweight + oy * vt, vcount[oy], n, acc);
        uint8_t *dst = out + ((oy0 + oy) * size + ox0) * 3, *dmask = mask + (oy0 + oy) * size + ox0;
        if (swap)
            horizontal(acc, hfirst, hcount, hweight, ht, out_cols, threshold, 1, dst, dmask);
        else
            horizontal(acc, hfirst, hcount, hweight, ht, out_cols, threshold, 0, dst, dmask);
    }
    free(tables);
    free(acc);
    return ANNA_OK;
}

static uint32_t read_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Read a whole file into *buffer (grown as needed); returns its length or -errno. */
static int64_t read_file(const char *path, uint8_t **buffer, int64_t *capacity)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat info;
    if (fstat(fd, &info) != 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    if (info.st_size > *capacity) {
        uint8_t *grown = realloc(*buffer, (size_t)info.st_size);
        if (!grown) {
            close(fd);
            return -ENOMEM;
        }
        *buffer = grown;
        *capacity = info.st_size;
    }
    int64_t got = 0;
    while (got < info.st_size) {
        ssize_t n = read(fd, *buffer + got, (size_t)(info.st_size - got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int error = errno;
            close(fd);
            return -error;
        }
        if (n == 0) break;
        got += n;
    }
    close(fd);
    return got;
}

/* Read an uncompressed 24-bit BMP and prepare it. Returns a status: anything but a complete,
 * plain 24-bit BMP is ANNA_NOT_BMP24 (left to the caller, which decodes it). (Reading in pieces
 * and scanning each while in cache measured no faster than one read and one scan.) */
static int prepare_bmp(const char *path, uint8_t **buffer, int64_t *capacity, int64_t size, int64_t margin,
                       int threshold, int64_t canvas, uint8_t *out, uint8_t *mask)
{
    int64_t length = read_file(path, buffer, capacity);
    if (length < 0) return (int)length;
    const uint8_t *data = *buffer;
    if (length < 54 || data[0] != 'B' || data[1] != 'M') return ANNA_NOT_BMP24;
    int64_t offset = read_u32(data + 10), header = read_u32(data + 14);
    int64_t width = (int32_t)read_u32(data + 18), height = (int32_t)read_u32(data + 22);
    int bits = data[28] | data[29] << 8;
    uint32_t compression = read_u32(data + 30);
    int64_t rows = height < 0 ? -height : height;
    /* too_large first: it bounds rows and width, so the size check below cannot overflow. */
    if (header < 40 || bits != 24 || compression != 0 || too_large(rows, width, size)) return ANNA_NOT_BMP24;
    int64_t stride = (width * 3 + 3) / 4 * 4;
    if (offset + stride * rows > length) return ANNA_NOT_BMP24; /* truncated */
    BoxScan scan = {-1, -1, width * 3, calloc((size_t)(width * 3), 1)};
    if (!scan.colmax) return -ENOMEM;
    scan_rows(&scan, data + offset, rows, stride, threshold); /* in file order */
    int64_t box[4];
    int status = finish_box(&scan, threshold, height > 0, rows, box);
    free(scan.colmax);
    if (status != ANNA_OK) return status;
    /* Positive height: rows stored bottom-up, so image row 0 is the last one. */
    const uint8_t *row0 = data + offset + (height > 0 ? (rows - 1) * stride : 0);
    return crop_resize_box(row0, rows, width, height > 0 ? -stride : stride, box, size, margin, threshold, canvas, 1,
                           out, mask);
}

/* Prepare n image files into images (n x size x size x 3, RGB) and masks (n x size x size).
 * Uncompressed 24-bit BMPs (the Kaggle format) are read and prepared here; any other file, and
 * any failure, gets a non-zero status[i] and is left for the caller (which decodes it and names
 * the problem). Returns the number of non-zero statuses. */
int64_t anna_prepare_files(int64_t n, const char *const *paths, int64_t size, int64_t margin, int threshold,
                           int64_t canvas, uint8_t *images, uint8_t *masks, int32_t *status)
{
    int64_t capacity = 1 << 20, failed = 0;
    uint8_t *buffer = malloc((size_t)capacity);
    for (int64_t i = 0; i < n; i++) {
        status[i] = buffer ? prepare_bmp(paths[i], &buffer, &capacity, size, margin, threshold, canvas,
                                         images + i * size * size * 3, masks + i * size * size)
                           : -ENOMEM;
        failed += status[i] != ANNA_OK;
    }
    free(buffer);
    return failed;
}
