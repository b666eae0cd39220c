/* crc32c.h - CRC32C (Castagnoli) of the memory node's page checksums: one implementation, used
 * by the C fault lane (fastlane.c) and, through cffi (transport.node._crc32c_cffi, wrapped by
 * transport/node/checksum.py), by the Python store. The same declarations are the cffi cdef. */
#ifndef SSI_CRC32C_H
#define SSI_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* CRC32C of len bytes at buf, continuing crc (0 to start; zlib's crc32 convention):
   ssi_crc32c(0, "123456789", 9) == 0xE3069283. With the CPU's crc32 instruction (SSE4.2,
   three interleaved streams) where it has one, else ssi_crc32c_table. */
uint32_t ssi_crc32c(uint32_t crc, const void *buf, size_t len);
/* The same, portable (slicing-by-8 tables): the fallback, and the tests' reference. */
uint32_t ssi_crc32c_table(uint32_t crc, const void *buf, size_t len);
/* 1 if ssi_crc32c uses the CPU's crc32 instruction, 0 if the tables. */
int ssi_crc32c_hardware(void);
/* out[i] = ssi_crc32c(0, buf + i * page_size, page_size) for i < npages. */
void ssi_crc32c_pages(const void *buf, size_t npages, size_t page_size, uint32_t *out);

#endif /* SSI_CRC32C_H */
