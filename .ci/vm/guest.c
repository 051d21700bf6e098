/*
 * roamdisk VM-migration guest: runs as the workload of the test VM's initramfs
 * (client/tests/vm_migration.rs; built into the initramfs by .ci/fetch-vm).
 *
 * Writes numbered 4 KiB blocks to a block device (default /dev/vda) with O_DIRECT,
 * block = seq % blocks, every block self-describing: magic, block number, sequence
 * number, run nonce, then 4064 bytes of a pseudo-random fill derived from all three.
 * fdatasync() every `roamdisk.flush` writes (a FLUSH to the virtual disk, which QEMU
 * passes on to the NBD server). It remembers the last sequence number written to each
 * block and measures the longest pause between two consecutive completed writes
 * (CLOCK_MONOTONIC of the guest: it does not advance while QEMU has the VM stopped for
 * the migration switchover, so this is the storage pause the running guest sees).
 *
 * Commands arrive on the console (stdin), one per line, checked between writes:
 *   PHASE <name>   ends the current phase (prints its writes and longest pause) and
 *                  starts a new one
 *   CHECK          pauses writing, re-reads every block written so far (O_DIRECT) and
 *                  compares it with what was last written there, then writes on (the
 *                  time it takes does not count as a pause)
 *   VERIFY         stops writing, flushes, and checks every block the same way
 *
 * Output lines (the test parses them):
 *   GUEST start blocks=<n> bsize=4096 flush=<n> nonce=<hex>
 *   WROTE n=<writes> seq=<seq> ms=<guest ms>            (progress)
 *   PAUSE ms=<ms> seq=<seq> phase=<name>                (any gap >= roamdisk.report_ms)
 *   PHASE_END name=<name> writes=<n> max_pause_ms=<ms> ms=<phase length less CHECKs>
 *   IOERR op=<write|flush|read> seq=<seq> block=<b> errno=<e>
 *   BAD block=<b> want_seq=<s> got_magic=<0|1> got_block=<b> got_seq=<s>   (first 10)
 *   CHECK ok=<n> bad=<n> ioerr=<n> writes=<n> ms=<time the check took>
 *   VERIFY ok=<n> bad=<n> ioerr=<n> writes=<n> max_pause_ms=<ms> max_pause_seq=<s>
 *
 * Options from the kernel command line: roamdisk.dev=/dev/vda roamdisk.flush=16
 * roamdisk.sleep_us=0 roamdisk.progress_ms=250 roamdisk.report_ms=100
 * roamdisk.max_blocks=0 (0: the whole device).
 *
 * Restart after a disaster (client/tests/vm_restart.rs): with
 * roamdisk.restart=<nonce hex>:<seq>, a freshly booted guest writes nothing; it checks
 * that every block a run with that nonce had written by sequence number <seq> (the
 * test's flushed-before-the-stated-time mark) holds that write or a later one of the
 * same run, whole (any later write of the block may have survived too), and prints
 *   RESTART ok=<n> bad=<n> ioerr=<n> newer=<n>   (newer: blocks holding a write past <seq>)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define BS 4096
#define MAGIC "RDVMBLK1"

static char cmdline[4096];

static const char *opt(const char *key, const char *dflt)
{
	static char val[256];
	size_t kl = strlen(key);
	for (char *p = cmdline; (p = strstr(p, key)) != NULL; p += kl) {
		if ((p == cmdline || p[-1] == ' ') && p[kl] == '=') {
			size_t n = strcspn(p + kl + 1, " \n");
			if (n >= sizeof val)
				n = sizeof val - 1;
			memcpy(val, p + kl + 1, n);
			val[n] = 0;
			return val;
		}
	}
	return dflt;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

static void fill(unsigned char *buf, uint64_t block, uint64_t seq, uint64_t nonce)
{
	memcpy(buf, MAGIC, 8);
	memcpy(buf + 8, &block, 8);
	memcpy(buf + 16, &seq, 8);
	memcpy(buf + 24, &nonce, 8);
	uint64_t x = mix(block * 0x9e3779b97f4a7c15ull ^ mix(seq) ^ nonce);
	for (size_t i = 32; i < BS; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(buf + i, &x, 8);
	}
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	for (int off = 0; off < n;) {
		ssize_t w = write(1, line + off, n - off);
		if (w <= 0)
			return;
		off += w;
	}
}

/* Re-reads every block written (want[b] != 0) and compares it with its last write. */
static void check(int fd, const uint64_t *want, uint64_t blocks, uint64_t nonce,
		  unsigned char *buf, unsigned char *rbuf, uint64_t *ok, uint64_t *bad,
		  uint64_t *ioerr)
{
	*ok = *bad = 0;
	for (uint64_t b = 0; b < blocks; b++) {
		if (!want[b])
			continue;
		ssize_t r = pread(fd, rbuf, BS, (off_t)(b * BS));
		if (r != BS) {
			(*ioerr)++;
			(*bad)++;
			say("IOERR op=read seq=%llu block=%llu errno=%d", (unsigned long long)want[b],
			    (unsigned long long)b, r < 0 ? errno : -1);
			continue;
		}
		fill(buf, b, want[b], nonce);
		if (memcmp(buf, rbuf, BS) == 0) {
			(*ok)++;
			continue;
		}
		if (*bad < 10) {
			uint64_t gb, gs;
			memcpy(&gb, rbuf + 8, 8);
			memcpy(&gs, rbuf + 16, 8);
			say("BAD block=%llu want_seq=%llu got_magic=%d got_block=%llu got_seq=%llu",
			    (unsigned long long)b, (unsigned long long)want[b],
			    memcmp(rbuf, MAGIC, 8) == 0, (unsigned long long)gb,
			    (unsigned long long)gs);
		}
		(*bad)++;
	}
}

/*
 * The restart check (see the header): block b was last written up to `upto` by the
 * largest seq <= upto with (seq - 1) % blocks == b; it must hold that one or a later
 * write of the block, whole.
 */
static int restart_check(int fd, uint64_t blocks, uint64_t nonce, uint64_t upto,
			 unsigned char *buf, unsigned char *rbuf)
{
	uint64_t ok = 0, bad = 0, ioerr = 0, newer = 0;
	for (uint64_t b = 0; b < blocks; b++) {
		uint64_t lower = upto >= b + 1 ? b + 1 + (upto - (b + 1)) / blocks * blocks : 0;
		ssize_t r = pread(fd, rbuf, BS, (off_t)(b * BS));
		if (r != BS) {
			ioerr++;
			bad++;
			continue;
		}
		uint64_t gb, gs, gn;
		memcpy(&gb, rbuf + 8, 8);
		memcpy(&gs, rbuf + 16, 8);
		memcpy(&gn, rbuf + 24, 8);
		int ours = memcmp(rbuf, MAGIC, 8) == 0 && gb == b && gn == nonce && gs >= 1 &&
			   (gs - 1) % blocks == b;
		if (ours) {
			fill(buf, b, gs, nonce);
			ours = memcmp(buf, rbuf, BS) == 0;
		}
		if (lower == 0 && !ours) {
			ok++; /* never written by the mark: anything (zeros, a torn later write) */
			continue;
		}
		if (ours && gs >= lower) {
			ok++;
			newer += gs > upto;
			continue;
		}
		if (bad < 10)
			say("BAD block=%llu want_seq=%llu got_magic=%d got_block=%llu got_seq=%llu",
			    (unsigned long long)b, (unsigned long long)lower,
			    memcmp(rbuf, MAGIC, 8) == 0, (unsigned long long)gb,
			    (unsigned long long)gs);
		bad++;
	}
	say("RESTART ok=%llu bad=%llu ioerr=%llu newer=%llu", (unsigned long long)ok,
	    (unsigned long long)bad, (unsigned long long)ioerr, (unsigned long long)newer);
	return bad ? 1 : 0;
}

int main(void)
{
	int cf = open("/proc/cmdline", O_RDONLY);
	if (cf >= 0) {
		ssize_t n = read(cf, cmdline, sizeof cmdline - 1);
		if (n > 0)
			cmdline[n] = 0;
		close(cf);
	}
	char dev[256];
	snprintf(dev, sizeof dev, "%s", opt("roamdisk.dev", "/dev/vda"));
	uint64_t flush_every = strtoull(opt("roamdisk.flush", "16"), NULL, 10);
	uint64_t sleep_us = strtoull(opt("roamdisk.sleep_us", "0"), NULL, 10);
	uint64_t progress_ns = strtoull(opt("roamdisk.progress_ms", "250"), NULL, 10) * 1000000u;
	uint64_t report_ns = strtoull(opt("roamdisk.report_ms", "100"), NULL, 10) * 1000000u;
	uint64_t max_blocks = strtoull(opt("roamdisk.max_blocks", "0"), NULL, 10);

	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0) {
		say("GUEST error open %s errno=%d", dev, errno);
		return 2;
	}
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) != 0 || size < BS) {
		say("GUEST error size of %s errno=%d", dev, errno);
		return 2;
	}
	uint64_t blocks = size / BS;
	if (max_blocks && max_blocks < blocks)
		blocks = max_blocks;
	uint64_t *want = calloc(blocks, sizeof *want);
	unsigned char *buf, *rbuf;
	if (!want || posix_memalign((void **)&buf, BS, BS) || posix_memalign((void **)&rbuf, BS, BS)) {
		say("GUEST error out of memory");
		return 2;
	}
	const char *restart = opt("roamdisk.restart", "");
	if (restart[0]) {
		char *end;
		uint64_t n = strtoull(restart, &end, 16);
		uint64_t upto = *end == ':' ? strtoull(end + 1, NULL, 10) : 0;
		say("GUEST restart blocks=%llu nonce=%016llx upto=%llu", (unsigned long long)blocks,
		    (unsigned long long)n, (unsigned long long)upto);
		return restart_check(fd, blocks, n, upto, buf, rbuf);
	}
	uint64_t nonce = mix(now_ns());
	int ur = open("/dev/urandom", O_RDONLY);
	if (ur >= 0) {
		if (read(ur, &nonce, sizeof nonce) != sizeof nonce)
			nonce = mix(now_ns());
		close(ur);
	}

	/* Commands: line mode, no echo. */
	struct termios t;
	if (tcgetattr(0, &t) == 0) {
		t.c_lflag &= ~(ECHO | ECHONL);
		t.c_lflag |= ICANON;
		tcsetattr(0, TCSANOW, &t);
	}
	char cmd[256];
	size_t cmd_len = 0;

	say("GUEST start dev=%s blocks=%llu bsize=%d flush=%llu nonce=%016llx", dev,
	    (unsigned long long)blocks, BS, (unsigned long long)flush_every,
	    (unsigned long long)nonce);

	uint64_t seq = 0, writes = 0, ioerr = 0;
	uint64_t t0 = now_ns(), last_done = t0, last_progress = t0;
	uint64_t max_pause = 0, max_pause_seq = 0;
	char phase[64] = "start";
	uint64_t phase_start = t0, phase_writes = 0, phase_max = 0, phase_idle = 0;
	int verify = 0;

	while (!verify) {
		/* Commands, if a whole line is there. */
		struct pollfd p = { .fd = 0, .events = POLLIN };
		while (poll(&p, 1, 0) == 1 && (p.revents & POLLIN)) {
			char c;
			ssize_t r = read(0, &c, 1);
			if (r != 1)
				break;
			if (c != '\n' && c != '\r') {
				if (cmd_len < sizeof cmd - 1)
					cmd[cmd_len++] = c;
				continue;
			}
			cmd[cmd_len] = 0;
			cmd_len = 0;
			if (strncmp(cmd, "PHASE ", 6) == 0 || strcmp(cmd, "VERIFY") == 0) {
				uint64_t t = now_ns();
				say("PHASE_END name=%s writes=%llu max_pause_ms=%.1f ms=%.0f", phase,
				    (unsigned long long)phase_writes, phase_max / 1e6,
				    (t - phase_start - phase_idle) / 1e6);
				snprintf(phase, sizeof phase, "%.63s", cmd[0] == 'P' ? cmd + 6 : "verify");
				phase_start = t;
				phase_writes = 0;
				phase_max = 0;
				phase_idle = 0;
				if (cmd[0] == 'V')
					verify = 1;
			} else if (strcmp(cmd, "CHECK") == 0) {
				uint64_t ok, bad, t = now_ns();
				check(fd, want, blocks, nonce, buf, rbuf, &ok, &bad, &ioerr);
				last_done = now_ns();
				phase_idle += last_done - t;
				say("CHECK ok=%llu bad=%llu ioerr=%llu writes=%llu ms=%.0f",
				    (unsigned long long)ok, (unsigned long long)bad,
				    (unsigned long long)ioerr, (unsigned long long)writes,
				    (last_done - t) / 1e6);
			} else if (cmd[0]) {
				say("GUEST unknown command '%s'", cmd);
			}
		}
		if (verify)
			break;

		seq++;
		uint64_t block = (seq - 1) % blocks;
		fill(buf, block, seq, nonce);
		ssize_t w = pwrite(fd, buf, BS, (off_t)(block * BS));
		if (w != BS) {
			ioerr++;
			want[block] = 0; /* contents unknown now: not verified */
			say("IOERR op=write seq=%llu block=%llu errno=%d", (unsigned long long)seq,
			    (unsigned long long)block, w < 0 ? errno : -1);
		} else {
			want[block] = seq;
		}
		if (flush_every && seq % flush_every == 0 && fdatasync(fd) != 0) {
			ioerr++;
			say("IOERR op=flush seq=%llu block=%llu errno=%d", (unsigned long long)seq,
			    (unsigned long long)block, errno);
		}
		uint64_t done = now_ns();
		uint64_t gap = done - last_done;
		last_done = done;
		writes++;
		phase_writes++;
		if (gap > max_pause) {
			max_pause = gap;
			max_pause_seq = seq;
		}
		if (gap > phase_max)
			phase_max = gap;
		if (report_ns && gap >= report_ns)
			say("PAUSE ms=%.1f seq=%llu phase=%s", gap / 1e6, (unsigned long long)seq, phase);
		if (done - last_progress >= progress_ns) {
			last_progress = done;
			say("WROTE n=%llu seq=%llu ms=%.0f", (unsigned long long)writes,
			    (unsigned long long)seq, (done - t0) / 1e6);
		}
		if (sleep_us)
			usleep(sleep_us);
	}

	if (fdatasync(fd) != 0) {
		ioerr++;
		say("IOERR op=flush seq=%llu block=0 errno=%d", (unsigned long long)seq, errno);
	}
	uint64_t ok = 0, bad = 0;
	check(fd, want, blocks, nonce, buf, rbuf, &ok, &bad, &ioerr);
	say("VERIFY ok=%llu bad=%llu ioerr=%llu writes=%llu max_pause_ms=%.1f max_pause_seq=%llu",
	    (unsigned long long)ok, (unsigned long long)bad, (unsigned long long)ioerr,
	    (unsigned long long)writes, max_pause / 1e6, (unsigned long long)max_pause_seq);
	close(fd);
	return bad || ioerr ? 1 : 0;
}
