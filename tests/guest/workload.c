/* workload.c - the test guest's computation, linked statically into the initramfs.
 *
 *   workload MIB PASSES [wait]
 *
 * Fills MIB MiB with a deterministic pattern, then rewrites all of it in PASSES passes, each
 * pass depending on the previous contents, and prints after each pass
 *     pass N checksum HEX
 * plus "pass N progress K/64" lines within a pass (so a resumed guest shows output soon), and at
 * the end "RESULT checksum HEX". The same MIB and PASSES give the same lines on every run: a
 * page the pager served wrongly (zero-filled, stale, misplaced) changes every later checksum.
 * With "wait", after each pass but the last it prints "pass N waiting" and reads one line from
 * stdin (the serial console) before going on, so a test can suspend the guest at a known point.
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

int main(int argc, char **argv)
{
	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: workload MIB PASSES [wait]\n");
		return 2;
	}
	size_t mib = strtoul(argv[1], NULL, 10);
	unsigned passes = strtoul(argv[2], NULL, 10);
	int wait = argc == 4 && strcmp(argv[3], "wait") == 0;
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
	for (unsigned p = 1; p <= passes; p++) {
		/* each word takes a value derived from itself, its mirror word and the word before
		 * it: order matters and a lost page changes everything after it */
		uint64_t carry = p;
		for (size_t i = 0; i < words; i++) {
			uint64_t far = a[words - 1 - i];
			a[i] = mix(a[i] ^ far ^ carry);
			carry = a[i];
			if (step && i % step == step - 1 && i + 1 < words)
				printf("pass %u progress %zu/64\n", p, (i + 1) / step);
		}
		sum = 0;
		for (size_t i = 0; i < words; i++)
			sum = mix(sum ^ a[i]);
		printf("pass %u checksum %016llx\n", p, (unsigned long long)sum);
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
