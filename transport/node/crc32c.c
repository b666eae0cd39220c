/* crc32c.c - CRC32C (Castagnoli, reflected polynomial 0x82F63B78); see crc32c.h.
 *
 * Where the CPU has SSE4.2 (checked once, at load, with __builtin_cpu_supports) its crc32
 * instruction does 8 bytes per step. One stream is bound by the instruction's latency (3
 * cycles), so long inputs are cut into three consecutive blocks of equal length whose CRCs are
 * computed side by side and then joined: the CRC register is linear, so the register after
 * A||B is shift(register after A, |B|) ^ (register over B started from 0), where shift(x, n)
 * is x advanced over n zero bytes, a linear map of x applied with four 256-entry tables (one
 * per byte of x), built at load for the two block lengths used. Without SSE4.2 (or on another
 * architecture) the portable slicing-by-8 tables serve every call.
 */
#include <string.h>

#include "crc32c.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the slicing-by-8 loads assume a little-endian host"
#endif

/* _mm_crc32_u64: 64-bit x86 only; -DSSI_CRC32C_NO_HW builds the portable path alone (tests) */
#if defined(__x86_64__) && !defined(SSI_CRC32C_NO_HW)
#include <nmmintrin.h>
#define SSI_CRC32C_X86 1
#endif

#define POLY 0x82F63B78u
#define LONG_BLOCK 1024  /* bytes per stream: 3 KiB of a 4 KiB page in one round */
#define SHORT_BLOCK 256  /* then 768 bytes in one more round, the rest one stream */

static uint32_t table[8][256];       /* slicing-by-8: table[k][b] = b advanced 8k more bytes */
static uint32_t shift_long[4][256];  /* byte k of x advanced over LONG_BLOCK zero bytes */
static uint32_t shift_short[4][256];
static int use_hw;

static uint32_t advance_zeros(uint32_t reg, size_t n)
{
    while (n--)
        reg = (reg >> 8) ^ table[0][reg & 0xff];
    return reg;
}

/* shift[k][b] = the register (b << 8k) advanced over n zero bytes, from the 32 basis images */
static void make_shift(uint32_t shift[4][256], size_t n)
{
    uint32_t basis[32];
    for (int i = 0; i < 32; i++)
        basis[i] = advance_zeros(1u << i, n);
    for (int k = 0; k < 4; k++)
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int i = 0; i < 8; i++)
                if (b >> i & 1)
                    v ^= basis[8 * k + i];
            shift[k][b] = v;
        }
}

__attribute__((constructor)) static void crc32c_init(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t r = b;
        for (int i = 0; i < 8; i++)
            r = r & 1 ? (r >> 1) ^ POLY : r >> 1;
        table[0][b] = r;
    }
    for (int b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++)
            table[k][b] = (table[k - 1][b] >> 8) ^ table[0][table[k - 1][b] & 0xff];
    make_shift(shift_long, LONG_BLOCK);
    make_shift(shift_short, SHORT_BLOCK);
#ifdef SSI_CRC32C_X86
    __builtin_cpu_init();
    use_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);  /* unaligned-safe; one load */
    return v;
}

uint32_t ssi_crc32c_table(uint32_t crc, const void *buf, size_t len)
{
    const unsigned char *p = buf;
    uint32_t reg = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        reg = (reg >> 8) ^ table[0][(reg ^ *p++) & 0xff];
        len--;
    }
    for (; len >= 8; len -= 8, p += 8) {
        uint64_t v = load64(p) ^ reg;
        reg = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff]
            ^ table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff]
            ^ table[2][(v >> 40) & 0xff] ^ table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
    }
    while (len--)
        reg = (reg >> 8) ^ table[0][(reg ^ *p++) & 0xff];
    return ~reg;
}

#ifdef SSI_CRC32C_X86
static inline uint32_t shift(const uint32_t s[4][256], uint32_t x)
{
    return s[0][x & 0xff] ^ s[1][(x >> 8) & 0xff] ^ s[2][(x >> 16) & 0xff] ^ s[3][x >> 24];
}

/* Three streams of blk bytes each from p, joined into reg; returns the new register. */
__attribute__((target("sse4.2"))) static inline uint64_t
three_streams(uint64_t reg, const unsigned char *p, size_t blk, const uint32_t s[4][256])
{
    uint64_t c1 = 0, c2 = 0;
    for (const unsigned char *end = p + blk; p < end; p += 8) {
        reg = _mm_crc32_u64(reg, load64(p));
        c1 = _mm_crc32_u64(c1, load64(p + blk));
        c2 = _mm_crc32_u64(c2, load64(p + 2 * blk));
    }
    reg = shift(s, (uint32_t)reg) ^ (uint32_t)c1;
    return shift(s, (uint32_t)reg) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const void *buf,
                                                            size_t len)
{
    const unsigned char *p = buf;
    uint64_t reg = (uint32_t)~crc;
    while (len && ((uintptr_t)p & 7)) {
        reg = _mm_crc32_u8((uint32_t)reg, *p++);
        len--;
    }
    for (; len >= 3 * LONG_BLOCK; len -= 3 * LONG_BLOCK, p += 3 * LONG_BLOCK)
        reg = three_streams(reg, p, LONG_BLOCK, shift_long);
    for (; len >= 3 * SHORT_BLOCK; len -= 3 * SHORT_BLOCK, p += 3 * SHORT_BLOCK)
        reg = three_streams(reg, p, SHORT_BLOCK, shift_short);
    for (; len >= 8; len -= 8, p += 8)
        reg = _mm_crc32_u64(reg, load64(p));
    while (len--)
        reg = _mm_crc32_u8((uint32_t)reg, *p++);
    return ~(uint32_t)reg;
}
#endif

uint32_t ssi_crc32c(uint32_t crc, const void *buf, size_t len)
{
#ifdef SSI_CRC32C_X86
    if (use_hw)
        return crc32c_hw(crc, buf, len);
#endif
    return ssi_crc32c_table(crc, buf, len);
}

int ssi_crc32c_hardware(void)
{
    return use_hw;
}

void ssi_crc32c_pages(const void *buf, size_t npages, size_t page_size, uint32_t *out)
{
    const unsigned char *p = buf;
    for (size_t i = 0; i < npages; i++, p += page_size)
        out[i] = ssi_crc32c(0, p, page_size);
}
