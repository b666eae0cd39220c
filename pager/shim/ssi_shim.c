/* ssi_shim.c - LD_PRELOAD library that puts an unmodified QEMU's guest RAM behind ssi-pager.
 *
 * QEMU has no userfaultfd handoff of its own. Preloaded by `ssi-pager vm`, this library watches
 * QEMU map its guest RAM, registers that mapping with a userfaultfd created inside QEMU, and
 * hands the uffd (and the RAM's memfd, if any) to the pager over the Firecracker UFFD handshake:
 * one sendmsg carrying a JSON array of regions and the fds by SCM_RIGHTS.
 *
 * Environment (set by `ssi-pager vm`, or by hand; left as it is, so a wrapper QEMU is
 * started through passes it on; without SSI_PAGER_SOCKET the library does nothing):
 *   SSI_PAGER_SOCKET     pager's Unix socket path
 *   SSI_PAGER_RAM_SIZE   guest RAM size in bytes (the mapping to take over)
 *   SSI_PAGER_SPACE      memory-node address space name for this guest (optional)
 *   SSI_PAGER_STATUS_FD  fd to which one line "ok base=0x.. size=N memfd=FD" is written
 *                        after a successful handoff (optional)
 *   SSI_PAGER_UFFD_FEATURES  UFFDIO_API features to request (default: EVENT_REMOVE)
 *
 * Finding guest RAM: QEMU maps it with a MAP_FIXED read-write mmap of exactly the RAM size,
 * anonymous private for plain -m, or MAP_SHARED from a memfd named "memory-backend-memfd" for
 * memory-backend-memfd (hugetlb=on too), or from a file on tmpfs or hugetlbfs (-mem-path, which
 * `ssi-pager vm` turns into a shared memory-backend-file). On hugetlbfs the handshake's
 * page_size is the file system's huge page size. Size alone is not enough (the TCG code buffer is a large anonymous
 * mapping, and QEMU makes other large reservations and a test memfd at start), so mmap, mmap64
 * and memfd_create are all hooked.
 *
 * Fails closed: any handoff error prints one line on stderr and exits QEMU, and a watcher thread
 * exits QEMU as soon as the pager hangs up, so the guest never runs on RAM nobody serves. The
 * library keeps its own reference to the uffd: if the pager dies, faulting vCPUs stay blocked
 * (instead of the kernel zero-filling their pages) until the watcher has stopped the process.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/magic.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define SHIM_EXIT_CODE 1
#define CONNECT_TIMEOUT_MS 5000
#define QEMU_MEMFD_NAME "memory-backend-memfd"

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef int (*memfd_create_fn)(const char *, unsigned int);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int handed_off;           /* guest RAM found and handed to the pager */
static int ram_memfd = -1;       /* last memfd QEMU created for memory-backend-memfd */
static int pager_sock = -1;      /* kept open: hang-up tells the pager QEMU exited */
static int uffd_keep = -1;       /* our reference: a dead pager leaves faults blocked, not zeroed */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void die(const char *fmt, ...)
{
	char msg[768];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	/* one write so the line is not interleaved with QEMU's own output */
	char line[832];
	int n = snprintf(line, sizeof(line), "ssi-pager shim: %s\n", msg);
	if (n > 0)
		(void)!write(2, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
	_exit(SHIM_EXIT_CODE);
}

static void *real_sym(const char *name)
{
	void *p = dlsym(RTLD_NEXT, name);
	if (!p)
		die("cannot find the real %s: %s", name, dlerror());
	return p;
}

/* read once at load, then removed from the environment so QEMU's helper children (the shell of
 * an exec: migration, for example) do not act on them */
static char cfg_socket[108];
static char cfg_space[256];
static uint64_t cfg_ram_size;
static int cfg_status_fd = -1;

static int active(void)
{
	return cfg_socket[0] != 0;
}

static uint64_t parse_ram_size(void)
{
	const char *s = getenv("SSI_PAGER_RAM_SIZE");
	char *end = NULL;
	if (!s || !*s)
		die("SSI_PAGER_RAM_SIZE is not set; start QEMU through `ssi-pager vm`");
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	long page = sysconf(_SC_PAGESIZE);
	if (errno || *end || strchr(s, '-') || v == 0 || v % (unsigned long long)page)
		die("SSI_PAGER_RAM_SIZE=%s is not a positive multiple of the page size (%ld bytes)",
		    s, page);
	return v;
}

/* ---- the userfaultfd ---------------------------------------------------------------------- */

static int uffd_open(void)
{
	int flags = O_CLOEXEC | O_NONBLOCK;
	/* no UFFD_USER_MODE_ONLY: QEMU's own main thread and kernel-side accesses fault too */
	int fd = (int)syscall(SYS_userfaultfd, flags);
	if (fd >= 0)
		return fd;
	int err = errno;
	/* vm.unprivileged_userfaultfd=0 or seccomp: /dev/userfaultfd (Linux 6.1+) may be allowed */
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
		int err2 = errno;
		close(dev);
		if (fd >= 0)
			return fd;
		errno = err2;
	}
	die("cannot create a userfaultfd: %s (syscall) / %s (/dev/userfaultfd); "
	    "run `ssi-pager check`, or as root `sysctl vm.unprivileged_userfaultfd=1` "
	    "or grant access to /dev/userfaultfd", strerror(err), strerror(errno));
}

static uint64_t wanted_features(void)
{
	const char *s = getenv("SSI_PAGER_UFFD_FEATURES");
	if (s && *s)
		return strtoull(s, NULL, 0);
	return UFFD_FEATURE_EVENT_REMOVE;
}

static int uffd_create(void)
{
	uint64_t want = wanted_features();
	int fd = uffd_open();
	struct uffdio_api api = {.api = UFFD_API, .features = want};
	if (ioctl(fd, UFFDIO_API, &api) == 0)
		return fd;
	/* a kernel without some wanted feature: UFFDIO_API may be done once per fd, so retry on
	 * a new one with only what the kernel supports */
	close(fd);
	fd = uffd_open();
	struct uffdio_api plain = {.api = UFFD_API, .features = 0};
	if (ioctl(fd, UFFDIO_API, &plain) != 0)
		die("UFFDIO_API failed: %s", strerror(errno));
	uint64_t got = plain.features & want;
	close(fd);
	fd = uffd_open();
	struct uffdio_api again = {.api = UFFD_API, .features = got};
	if (ioctl(fd, UFFDIO_API, &again) != 0)
		die("UFFDIO_API with features 0x%" PRIx64 " failed: %s", got, strerror(errno));
	return fd;
}

static void uffd_register(int fd, void *addr, size_t len)
{
	struct uffdio_register reg = {
		.range = {.start = (uintptr_t)addr, .len = len},
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
		die("cannot register guest RAM %p+%zu with userfaultfd: %s (the RAM backend must be "
		    "anonymous memory, memory-backend-memfd or a tmpfs file)", addr, len,
		    strerror(errno));
	if (!(reg.ioctls & ((uint64_t)1 << _UFFDIO_COPY)))
		die("userfaultfd on guest RAM does not allow UFFDIO_COPY; unsupported RAM backend");
}

/* ---- the handoff ------------------------------------------------------------------------ */

static int connect_pager(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(sa.sun_path))
		die("pager socket path too long: %s", path);
	strcpy(sa.sun_path, path);
	struct timespec pause = {0, 20 * 1000 * 1000};
	for (int waited = 0;; waited += 20) {
		int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s < 0)
			die("socket: %s", strerror(errno));
		if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			return s;
		int err = errno;
		close(s);
		if ((err != ECONNREFUSED && err != EAGAIN) ||
		    waited >= CONNECT_TIMEOUT_MS)
			die("cannot reach the pager at %s: %s; start it with `ssi-pager serve --socket "
			    "%s` or run QEMU through `ssi-pager vm`", path, strerror(err), path);
		nanosleep(&pause, NULL);
	}
}

static void json_escape(char *out, size_t cap, const char *in)
{
	size_t o = 0;
	for (; *in && o + 7 < cap; in++) {
		unsigned char c = (unsigned char)*in;
		if (c == '"' || c == '\\') {
			out[o++] = '\\';
			out[o++] = (char)c;
		} else if (c < 0x20) {
			o += (size_t)snprintf(out + o, cap - o, "\\u%04x", c);
		} else {
			out[o++] = (char)c;
		}
	}
	out[o] = 0;
}

static void send_handshake(int sock, int uffd, int memfd, void *base, size_t size, off_t offset,
			   uint64_t page_size)
{
	char space[256] = "", space_json[300] = "";
	const char *sp = cfg_space;
	if (*sp) {
		json_escape(space, sizeof(space), sp);
		snprintf(space_json, sizeof(space_json), ", \"space\": \"%s\"", space);
	}
	char body[1024];
	int n = snprintf(body, sizeof(body),
			 "[{\"base_host_virt_addr\": %" PRIuPTR ", \"size\": %zu, \"offset\": %lld, "
			 "\"page_size\": %" PRIu64 ", \"page_size_kib\": %" PRIu64 "%s%s}]",
			 (uintptr_t)base, size, (long long)offset, page_size, page_size, space_json,
			 memfd >= 0 ? ", \"memfd\": true" : "");
	int fds[2] = {uffd, memfd};
	int nfds = memfd >= 0 ? 2 : 1;
	union {
		char buf[CMSG_SPACE(sizeof(fds))];
		struct cmsghdr align;
	} ctl;
	memset(&ctl, 0, sizeof(ctl));
	struct iovec iov = {.iov_base = body, .iov_len = (size_t)n};
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = ctl.buf,
		.msg_controllen = CMSG_SPACE(sizeof(int) * nfds),
	};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
	memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
	ssize_t sent;
	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	if (sent != n)
		die("sending the handshake to the pager failed: %s",
		    sent < 0 ? strerror(errno) : "short write");
}

static void *watch_pager(void *arg)
{
	(void)arg;
	for (;;) {
		struct pollfd p = {.fd = pager_sock, .events = POLLIN | POLLRDHUP};
		int r = poll(&p, 1, -1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r > 0 && (p.revents & POLLIN) && !(p.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
			char buf[256];
			ssize_t got = recv(pager_sock, buf, sizeof(buf), MSG_DONTWAIT);
			if (got > 0 || (got < 0 && (errno == EAGAIN || errno == EINTR)))
				continue;
		}
		die("the pager closed the handoff socket (it exited or refused this VM); stopping "
		    "QEMU so the guest never runs on unserved memory (see the pager's log)");
	}
	return NULL;
}

static void status_line(void *base, size_t size, int memfd)
{
	int fd = cfg_status_fd;
	if (fd < 0)
		return;
	char line[160];
	int n = snprintf(line, sizeof(line), "ok base=0x%" PRIxPTR " size=%zu memfd=%d pid=%d\n",
			 (uintptr_t)base, size, memfd, (int)getpid());
	(void)!write(fd, line, (size_t)n);
	close(fd);
}

/* Called with the lock held, right after QEMU mapped what looks like guest RAM. */
static void hand_off(void *base, size_t size, int memfd, off_t offset, uint64_t page_size)
{
	const char *path = cfg_socket;
	if (size % page_size || (uintptr_t)base % page_size)
		die("guest RAM %p+%zu is not aligned to its %" PRIu64 " KiB pages", base, size,
		    page_size >> 10);
	int uffd = uffd_create();
	uffd_register(uffd, base, size);
	int sock = connect_pager(path);
	send_handshake(sock, uffd, memfd, base, size, offset, page_size);
	pager_sock = sock;
	uffd_keep = uffd;
	handed_off = 1;

	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with QEMU's own threads */
	pthread_t t;
	int err = pthread_create(&t, NULL, watch_pager, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err)
		die("cannot start the pager watcher thread: %s", strerror(err));
	pthread_detach(t);
	status_line(base, size, memfd);
}

/* Whether fd is guest RAM; *page_size set to its page size. */
static int fd_is_ram_file(int fd, uint64_t *page_size)
{
	struct statfs sfs;
	if (fstatfs(fd, &sfs) != 0)
		return 0;
	int huge = (unsigned long)sfs.f_type == HUGETLBFS_MAGIC;
	*page_size = huge ? (uint64_t)sfs.f_bsize : 4096;
	if (fd == ram_memfd || huge)
		return 1;
	char link[64], target[256];
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, target, sizeof(target) - 1);
	if (n <= 0)
		return 0;
	target[n] = 0;
	return strncmp(target, "/memfd:" QEMU_MEMFD_NAME, strlen("/memfd:" QEMU_MEMFD_NAME)) == 0 ||
	       (unsigned long)sfs.f_type == TMPFS_MAGIC;
}

static void *hooked_mmap(mmap_fn real, void *addr, size_t len, int prot, int flags, int fd,
			 off_t off)
{
	void *p = real(addr, len, prot, flags, fd, off);
	if (p == MAP_FAILED || !active() || !(flags & MAP_FIXED) ||
	    (prot & (PROT_READ | PROT_WRITE)) != (PROT_READ | PROT_WRITE))
		return p;
	pthread_mutex_lock(&lock);
	if (!handed_off && len == cfg_ram_size) {
		uint64_t page = 4096;
		int anon = (flags & MAP_ANONYMOUS) && fd < 0 && !(flags & MAP_SHARED);
		int shared_file = fd >= 0 && (flags & MAP_SHARED) && fd_is_ram_file(fd, &page);
		if (anon)
			hand_off(p, len, -1, 0, page);
		else if (shared_file)
			hand_off(p, len, fd, off, page);
	}
	pthread_mutex_unlock(&lock);
	return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	static mmap_fn real;
	if (!real)
		real = (mmap_fn)real_sym("mmap");
	return hooked_mmap(real, addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	static mmap_fn real;
	if (!real)
		real = (mmap_fn)real_sym("mmap64");
	return hooked_mmap(real, addr, len, prot, flags, fd, off);
}

int memfd_create(const char *name, unsigned int flags)
{
	static memfd_create_fn real;
	if (!real)
		real = (memfd_create_fn)real_sym("memfd_create");
	int fd = real(name, flags);
	if (fd >= 0 && name && strcmp(name, QEMU_MEMFD_NAME) == 0 && active()) {
		pthread_mutex_lock(&lock);
		ram_memfd = fd;
		pthread_mutex_unlock(&lock);
	}
	return fd;
}

__attribute__((constructor)) static void shim_init(void)
{
	const char *sock = getenv("SSI_PAGER_SOCKET");
	if (!sock || !*sock)
		return;
	if (strlen(sock) >= sizeof(cfg_socket))
		die("SSI_PAGER_SOCKET path is too long (max %zu bytes): %s", sizeof(cfg_socket) - 1,
		    sock);
	cfg_ram_size = parse_ram_size(); /* a bad value fails at start, not at the first mmap */
	const char *sp = getenv("SSI_PAGER_SPACE");
	if (sp)
		snprintf(cfg_space, sizeof(cfg_space), "%s", sp);
	const char *st = getenv("SSI_PAGER_STATUS_FD");
	if (st && *st) {
		cfg_status_fd = atoi(st);
		fcntl(cfg_status_fd, F_SETFD, FD_CLOEXEC); /* not inherited by helper children */
	}
	strcpy(cfg_socket, sock);
	/* The SSI_PAGER_* variables stay in the environment: a wrapper QEMU is started
	 * through (env, setsid, taskset, numactl) loads this library too and must pass them
	 * on to QEMU. A process that never maps guest RAM (a wrapper, a helper QEMU starts)
	 * hands nothing over. */
}
