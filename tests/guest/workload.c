/* workload.c - the test guest's computation, linked statically into the initramfs.
 *
 *   workload MIB PASSES [wait] [scatter]
 *
 * Fills MIB MiB with a deterministic pattern, then rewrites all of it in PASSES passes, each
 * pass depending on the previous contents, and prints after each pass
 *     pass N checksum HEX
 * plus "pass N progress K/64" lines within a pass (so a resumed guest shows output soon), and at
 * the end "RESULT checksum HEX". The same MIB and PASSES give the same lines on every run: a
 * page the pager served wrongly (zero-filled, stale, misplaced) changes every later checksum.
 * With "wait", after each pass but the last it prints "pass N waiting" and reads one line from
 * stdin (the serial console) before going on, so a test can suspend the guest at a known point.
 * With "scatter", each pass after the fill touches one word of every 4 KiB page instead of
 * rewriting every word, visiting the pages in a fixed scattered order (a prime stride modulo the
 * page count): a pass costs little computation, so after a lazy resume its time is the time of
 * its page faults (the case working-set prefetch is for).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* each word takes a value derived from itself, its mirror word and the word before it: order
 * matters and a lost page changes everything after it */
static void dense_pass(uint64_t *a, size_t words, unsigned p, size_t step)
{
	uint64_t carry = p;
	for (size_t i = 0; i < words; i++) {
		uint64_t far = a[words - 1 - i];
		a[i] = mix(a[i] ^ far ^ carry);
		carry = a[i];
		if (step && i % step == step - 1 && i + 1 < words)
			printf("pass %u progress %zu/64\n", p, (i + 1) / step);
	}
}

int main(int argc, char **argv)
{
	int wait = 0, scatter = 0;
	for (int k = 3; k < argc; k++) {
		if (strcmp(argv[k], "wait") == 0)
			wait = 1;
		else if (strcmp(argv[k], "scatter") == 0)
			scatter = 1;
		else
			argc = 0;
	}
	if (argc < 3) {
		fprintf(stderr, "usage: workload MIB PASSES [wait] [scatter]\n");
		return 2;
	}
	size_t mib = strtoul(argv[1], NULL, 10);
	unsigned passes = strtoul(argv[2], NULL, 10);
	size_t words = mib << 17; /* 8-byte words per MiB = 2^17 */
	uint64_t *a = mmap(NULL, words * 8, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED) {
		perror("workload: mmap");
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (size_t i = 0; i < words; i++)
		a[i] = mix(i);
	printf("filled %zu MiB\n", mib);
	uint64_t sum = 0;
	size_t step = words / 64;
	/* a prime above any page count: k * stride mod pages visits every page once */
	size_t pages = words / 512, stride = 1000003;
	for (unsigned p = 1; p <= passes; p++) {
		if (scatter) {
			/* one word per page, pages in a scattered order, each value chained to the
			 * one before: a page served wrongly changes every later checksum */
			uint64_t carry = p;
			size_t pstep = pages / 64;
			for (size_t k = 0; k < pages; k++) {
				size_t w = ((k * stride) % pages) * 512 + (p * 67) % 512;
				a[w] = mix(a[w] ^ carry);
				carry = a[w];
				if (pstep && k % pstep == pstep - 1 && k + 1 < pages)
					printf("pass %u progress %zu/64\n", p, (k + 1) / pstep);
			}
			printf("pass %u checksum %016llx\n", p, (unsigned long long)carry);
			sum = carry;
		} else {
			dense_pass(a, words, p, step);
			sum = 0;
			for (size_t i = 0; i < words; i++)
				sum = mix(sum ^ a[i]);
			printf("pass %u checksum %016llx\n", p, (unsigned long long)sum);
		}
		if (wait && p < passes) {
			char line[64];
			printf("pass %u waiting\n", p);
			if (!fgets(line, sizeof line, stdin))
				return 3; /* console closed: nobody will ever say go */
		}
	}
	printf("RESULT checksum %016llx\n", (unsigned long long)sum);
	return 0;
}
