/* ssip_wire.h - the SSIP frame format for C; GENERATED from transport/wire/frames.py
 * by transport/wire/cheader.py. Do not edit: run `python -m transport.wire.cheader`. */
#ifndef SSIP_WIRE_H
#define SSIP_WIRE_H

#include <stdint.h>

#define SSIP_MAGIC "SSIP"               /* 4 bytes, not NUL-terminated on the wire */
#define SSIP_VERSION 1u                 /* header version byte */
#define SSIP_HEADER_SIZE 32u            /* fixed little-endian header */
#define SSIP_PAGE_SHIFT 12u             /* wire page (zero-mask granule) */
#define SSIP_PAGE_SIZE 4096u
#define SSIP_MAX_PAGES 32u              /* pages per FETCH/STORE frame (zero mask is u32) */
#define SSIP_MAX_DATA 131072u           /* page bytes per frame */
#define SSIP_MAX_CONTROL 65536u         /* msgpack bytes per control frame */
#define SSIP_T_HELLO 1u
#define SSIP_T_WELCOME 2u
#define SSIP_T_AUTH 3u
#define SSIP_T_AUTH_OK 4u
#define SSIP_T_OPEN 5u
#define SSIP_T_OPENED 6u
#define SSIP_T_FETCH 7u
#define SSIP_T_DATA 8u
#define SSIP_T_STORE 9u
#define SSIP_T_STORED 10u
#define SSIP_T_PING 11u
#define SSIP_T_PONG 12u
#define SSIP_T_STATS 13u
#define SSIP_T_STATS_REPLY 14u
#define SSIP_T_ERROR 15u
#define SSIP_FLAG_URGENT 1u
#define SSIP_FLAG_COMPRESSED 2u
#define SSIP_E_BAD_FRAME 1u
#define SSIP_E_TOO_LARGE 2u
#define SSIP_E_UNKNOWN_TYPE 3u
#define SSIP_E_MISALIGNED 4u
#define SSIP_E_OUT_OF_RANGE 5u
#define SSIP_E_AUTH_REQUIRED 6u
#define SSIP_E_AUTH_FAILED 7u
#define SSIP_E_VERSION 8u
#define SSIP_E_NO_SUCH_SPACE 9u
#define SSIP_E_BAD_MESSAGE 10u
#define SSIP_E_IO_ERROR 11u
#define SSIP_E_STALE_EPOCH 12u
#define SSIP_E_CORRUPT 13u

/* header fields, in order: magic | version u8 | type u8 | flags u16 | request id u32 |
 * space u32 | gpa u64 | length u32 | arg u32 (all little-endian) */
struct ssip_header {
    char magic[4];
    uint8_t version;
    uint8_t type;
    uint16_t flags;
    uint32_t request_id;
    uint32_t space;
    uint64_t gpa;
    uint32_t length;
    uint32_t arg;
} __attribute__((packed));

_Static_assert(sizeof(struct ssip_header) == SSIP_HEADER_SIZE, "SSIP header size");

#endif /* SSIP_WIRE_H */
