/*
 * ferrybench: the I/O workload of Ferry's device benchmarks (bench/src/io.rs). The same
 * static binary runs inside the guest and on the host, so a ratio compares the device path
 * and nothing else.
 *
 *   ferrybench disk PATH MIB SECONDS   sequential write and read (1 MiB), then random 4 KiB
 *                                      reads and writes for SECONDS each, over the first MIB
 *                                      MiB of PATH; direct I/O where the file allows it
 *   ferrybench recv PORT               accepts one TCP connection, reads it to the end
 *   ferrybench send HOST PORT SECONDS  connects and writes for SECONDS
 *
 * Results are lines `BENCH <name> <value> <unit>`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "ferrybench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int disk(const char *path, long mib, double seconds)
{
	const size_t big = 1 << 20, small = 4096;
	int direct = 1;
	int fd = open(path, O_RDWR | O_DIRECT);
	if (fd < 0) {
		direct = 0;
		fd = open(path, O_RDWR);
	}
	if (fd < 0)
		die(path);
	char *buf;
	if (posix_memalign((void **)&buf, 4096, big))
		die("memory");
	memset(buf, 0x5a, big);
	printf("BENCH disk-direct-io %d bool\n", direct);

	double t = now();
	for (long i = 0; i < mib; i++)
		if (pwrite(fd, buf, big, (off_t)i * big) != (ssize_t)big)
			die("write");
	if (fdatasync(fd))
		die("fdatasync");
	printf("BENCH disk-seq-write %.1f MB/s\n", mib * 1.048576 / (now() - t));

	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	t = now();
	for (long i = 0; i < mib; i++)
		if (pread(fd, buf, big, (off_t)i * big) != (ssize_t)big)
			die("read");
	printf("BENCH disk-seq-read %.1f MB/s\n", mib * 1.048576 / (now() - t));

	long blocks = mib * (big / small);
	for (int write = 0; write < 2; write++) {
		long ops = 0;
		t = now();
		double end = t + seconds;
		while (now() < end) {
			for (int k = 0; k < 64; k++) {
				off_t off = (off_t)(next_random() % blocks) * small;
				ssize_t n = write ? pwrite(fd, buf, small, off) : pread(fd, buf, small, off);
				if (n != (ssize_t)small)
					die(write ? "random write" : "random read");
				ops++;
			}
		}
		if (write && fdatasync(fd))
			die("fdatasync");
		printf("BENCH disk-rand-%s %.0f IOPS\n", write ? "write" : "read", ops / (now() - t));
	}
	close(fd);
	return 0;
}

static int recv_side(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1))
		die("listen");
	printf("BENCH recv-listening %d port\n", port);
	fflush(stdout);
	int c = accept(s, NULL, NULL);
	if (c < 0)
		die("accept");
	static char buf[1 << 16];
	uint64_t total = 0;
	double t = 0;
	for (;;) {
		ssize_t n = read(c, buf, sizeof buf);
		if (n < 0)
			die("recv");
		if (n == 0)
			break;
		if (total == 0)
			t = now();
		total += n;
	}
	double dt = now() - t;
	printf("BENCH recv %.1f MB/s\n", dt > 0 ? total / 1e6 / dt : 0.0);
	printf("BENCH recv-bytes %llu bytes\n", (unsigned long long)total);
	return 0;
}

static int send_side(const char *host, int port, double seconds)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		fprintf(stderr, "ferrybench: bad address %s\n", host);
		return 1;
	}
	/* The receiver may still be starting: retry for 10 s. */
	double give_up = now() + 10;
	while (connect(s, (struct sockaddr *)&a, sizeof a)) {
		if (now() > give_up)
			die("connect");
		close(s);
		s = socket(AF_INET, SOCK_STREAM, 0);
		usleep(100000);
	}
	static char buf[1 << 16];
	memset(buf, 0x42, sizeof buf);
	uint64_t total = 0;
	double t = now(), end = t + seconds;
	while (now() < end) {
		ssize_t n = write(s, buf, sizeof buf);
		if (n < 0)
			die("send");
		total += n;
	}
	shutdown(s, SHUT_WR);
	char c;
	while (read(s, &c, 1) > 0)
		;
	printf("BENCH send %.1f MB/s\n", total / 1e6 / (now() - t));
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 5 && !strcmp(argv[1], "disk"))
		return disk(argv[2], atol(argv[3]), atof(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "recv"))
		return recv_side(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "send"))
		return send_side(argv[2], atoi(argv[3]), atof(argv[4]));
	fprintf(stderr, "usage: ferrybench disk PATH MIB SECONDS | recv PORT | send HOST PORT SECONDS\n");
	return 2;
}
