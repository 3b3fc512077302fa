/*
 * Ferry's bare-metal dirtier: a tiny guest for migration tests on any KVM, including the
 * machine's slow emulating one.
 *
 * Every vCPU fills its share of a buffer with a pattern derived from the page index (no zero
 * pages), then rewrites byte 0 of its pages round-robin at a set rate, keeping a running checksum
 * (sum over pages of byte0 * (page + 1)) in guest memory. vCPU 0 prints, every `beat_ms`:
 *     beat <n> ok
 * after re-verifying the checksum of every vCPU's share and the full pattern of a rotating
 * window of pages, or `beat <n> BAD <reason> [page=<p> byte0=<v> shadow=<v> word=<i> zero|garbled]`
 * on any mismatch or a stalled vCPU (the details say which page and which copy is stale).
 *
 * At start vCPU 0 prints the CPUID feature registers it sees:
 *     cpuid 1.ecx=<hex> 1.edx=<hex> 7.ebx=<hex> 7.ecx=<hex> 7.edx=<hex> d.eax=<hex> x1.ecx=<hex> x1.edx=<hex>
 *
 * Parameters come from the command line in the boot-info block: `mb=<MiB> rate=<pages/s>
 * beat_ms=<ms> period=<words> reset_after=<beats> busy=<percent>` (defaults: mb=4, rate=2000,
 * beat_ms=200, period=512, reset_after=0 = never, busy=100). With busy below 100, every vCPU
 * works (dirties and spins) for that share of each 10 ms and halts the rest, woken by its
 * local APIC timer: the VM's CPU demand on its host (busy=0: nearly idle; the dirtying and
 * the beats go on). With reset_after=N, vCPU 0 resets the machine through
 * the i8042 (port 0x64, 0xfe) after beat N: a guest that stops on its own, for tests.
 * rate=0 dirties as fast as it can. The pattern of a page repeats every `period` 8-byte words:
 * 512 gives incompressible pages, small values pages that compress well (like real memory).
 */
#include <stdint.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define MAX_CPUS 64
#define VERIFY_WINDOW 8
#define BOOT_MAGIC 0x544f4f4259525245ULL /* "ERRYBOOT" little endian of FERRY boot */

struct boot_info {
	uint64_t magic;
	uint64_t mem_size;      /* bytes of guest RAM below 4 GiB usable by the guest */
	uint64_t free_start;    /* first free byte after the image */
	uint64_t tsc_khz;
	uint64_t cmdline;       /* guest-physical address of a NUL-terminated string */
	uint32_t nr_cpus;
	uint32_t reserved;
};

struct cpu_slot {
	volatile uint64_t started;
	volatile uint64_t progress;   /* pages written so far */
	volatile uint64_t csum;       /* running checksum of this vCPU's share */
	volatile uint64_t first_page;
	volatile uint64_t npages;
	volatile uint64_t pos;
};

static struct cpu_slot slots[MAX_CPUS];
static volatile uint64_t beat_counter;
static volatile uint64_t fill_done;

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

static void putc_serial(char c)
{
	while (!(inb(0x3f8 + 5) & 0x20))
		cpu_relax();
	outb(0x3f8, (uint8_t)c);
}

static void puts_serial(const char *s)
{
	while (*s)
		putc_serial(*s++);
}

static void put_u64(uint64_t v)
{
	char buf[24];
	int i = 0;
	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		putc_serial(buf[--i]);
}

static void put_hex32(uint32_t v)
{
	for (int i = 28; i >= 0; i -= 4)
		putc_serial("0123456789abcdef"[(v >> i) & 0xf]);
}

static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* One line with the CPUID registers that hold feature bits, so a test can compare what the
 * guest sees with what its CPU model promises. */
static void print_cpuid(void)
{
	uint32_t l1[4], l7[4], ld[4], x1[4], max[4], xmax[4];
	cpuid(0, 0, max);
	cpuid(0x80000000, 0, xmax);
	cpuid(1, 0, l1);
	if (max[0] >= 7) cpuid(7, 0, l7); else l7[1] = l7[2] = l7[3] = 0;
	if (max[0] >= 0xd) cpuid(0xd, 0, ld); else ld[0] = 0;
	if (xmax[0] >= 0x80000001) cpuid(0x80000001, 0, x1); else x1[2] = x1[3] = 0;
	puts_serial("cpuid 1.ecx="); put_hex32(l1[2]);
	puts_serial(" 1.edx="); put_hex32(l1[3]);
	puts_serial(" 7.ebx="); put_hex32(l7[1]);
	puts_serial(" 7.ecx="); put_hex32(l7[2]);
	puts_serial(" 7.edx="); put_hex32(l7[3]);
	puts_serial(" d.eax="); put_hex32(ld[0]);
	puts_serial(" x1.ecx="); put_hex32(x1[2]);
	puts_serial(" x1.edx="); put_hex32(x1[3]);
	puts_serial("\n");
}

static uint64_t parse_param(const char *cmdline, const char *key, uint64_t dflt)
{
	if (!cmdline)
		return dflt;
	for (const char *p = cmdline; *p; p++) {
		if (p != cmdline && p[-1] != ' ')
			continue;
		const char *k = key, *q = p;
		while (*k && *q == *k) {
			k++;
			q++;
		}
		if (*k || *q != '=')
			continue;
		q++;
		uint64_t v = 0;
		while (*q >= '0' && *q <= '9')
			v = v * 10 + (uint64_t)(*q++ - '0');
		return v;
	}
	return dflt;
}

static uint64_t period = WORDS;

static inline uint64_t pattern(uint64_t page, uint64_t word)
{
	return ((page + 1) * 0x9E3779B97F4A7C15ULL) ^ ((word % period) * 0xD1B54A32D192ED03ULL);
}

static uint8_t *buffer;

/* A second record of every page's byte 0 (for buffers up to 1 GiB), so that a checksum failure
 * can name the page and say which copy is stale: memory one step behind the shadow means a
 * write to the buffer was lost, the shadow one step behind means a write to this array was. */
#define SHADOW_PAGES (1UL << 18)
static uint8_t shadow[SHADOW_PAGES];

static void fill_share(struct cpu_slot *s)
{
	uint64_t csum = 0;
	for (uint64_t p = s->first_page; p < s->first_page + s->npages; p++) {
		uint64_t *w = (uint64_t *)(buffer + p * PAGE);
		for (uint64_t i = 0; i < WORDS; i++)
			w[i] = pattern(p, i);
		csum += (uint64_t)buffer[p * PAGE] * (p + 1);
		if (p < SHADOW_PAGES)
			shadow[p] = buffer[p * PAGE];
	}
	s->csum = csum;
}

static void dirty_pages(struct cpu_slot *s, uint64_t todo)
{
	for (uint64_t k = 0; k < todo && s->npages; k++) {
		uint64_t p = s->first_page + s->pos;
		uint8_t *b = buffer + p * PAGE;
		uint8_t o = *b, n = (uint8_t)(o * 5 + 1);
		*b = n;
		if (p < SHADOW_PAGES)
			shadow[p] = n;
		s->csum += ((uint64_t)n - (uint64_t)o) * (p + 1);
		if (++s->pos == s->npages)
			s->pos = 0;
	}
	s->progress += todo;
}

/* Returns 0 when the share's checksum matches memory. */
static int verify_csum(struct cpu_slot *s)
{
	uint64_t sum = 0;
	for (uint64_t p = s->first_page; p < s->first_page + s->npages; p++)
		sum += (uint64_t)buffer[p * PAGE] * (p + 1);
	return sum != s->csum;
}

/* The first page of a share whose byte 0 differs from its shadow, or UINT64_MAX. */
static uint64_t shadow_mismatch(struct cpu_slot *s)
{
	for (uint64_t p = s->first_page; p < s->first_page + s->npages && p < SHADOW_PAGES; p++)
		if (buffer[p * PAGE] != shadow[p])
			return p;
	return UINT64_MAX;
}

/* The first word of page `p` that differs from the pattern (byte 0 excluded). */
static uint64_t first_bad_word(uint64_t p)
{
	const uint64_t *w = (const uint64_t *)(buffer + p * PAGE);
	if ((w[0] ^ pattern(p, 0)) & ~0xffULL)
		return 0;
	for (uint64_t i = 1; i < WORDS; i++)
		if (w[i] != pattern(p, i))
			return i;
	return WORDS;
}

/* Returns the first bad page of the window, or UINT64_MAX when all are intact. */
static uint64_t verify_window(uint64_t start, uint64_t count, uint64_t npages)
{
	for (uint64_t k = 0; k < count && npages; k++) {
		uint64_t p = (start + k) % npages;
		const uint64_t *w = (const uint64_t *)(buffer + p * PAGE);
		if ((w[0] ^ pattern(p, 0)) & ~0xffULL)
			return p;
		for (uint64_t i = 1; i < WORDS; i++)
			if (w[i] != pattern(p, i))
				return p;
	}
	return UINT64_MAX;
}

/* The local APIC (identity mapped with the first 4 GiB) and a minimal IDT for its timer. */
#define LAPIC_BASE 0xfee00000UL
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define TIMER_VECTOR 32
#define SPURIOUS_VECTOR 0xff

struct idt_gate {
	uint16_t off0;
	uint16_t selector;
	uint8_t ist;
	uint8_t attr;
	uint16_t off1;
	uint32_t off2;
	uint32_t zero;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
extern void timer_isr(void);
extern void spurious_isr(void);

static inline void lapic_write(uint32_t reg, uint32_t v) { *(volatile uint32_t *)(LAPIC_BASE + reg) = v; }
static inline uint32_t lapic_read(uint32_t reg) { return *(volatile uint32_t *)(LAPIC_BASE + reg); }

static void idt_gate_set(int vector, void (*handler)(void), uint16_t cs)
{
	uint64_t a = (uint64_t)(uintptr_t)handler;
	idt[vector] = (struct idt_gate){
		.off0 = (uint16_t)a,
		.selector = cs,
		.ist = 0,
		.attr = 0x8e, /* present, ring 0, 64-bit interrupt gate */
		.off1 = (uint16_t)(a >> 16),
		.off2 = (uint32_t)(a >> 32),
		.zero = 0,
	};
}

/* Sets up this vCPU's IDT and local APIC timer (one-shot, divide by 1) and returns its ticks
 * per millisecond, measured against the TSC. Every vCPU writes the same gates. */
static uint64_t lapic_timer_init(uint64_t tsc_hz)
{
	uint16_t cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	idt_gate_set(TIMER_VECTOR, timer_isr, cs);
	idt_gate_set(SPURIOUS_VECTOR, spurious_isr, cs);
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)(uintptr_t)idt};
	__asm__ volatile("lidt %0" ::"m"(idtr));
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
	lapic_write(LAPIC_TIMER_DIV, 0xb);
	lapic_write(LAPIC_LVT_TIMER, 1u << 16); /* masked while measuring */
	lapic_write(LAPIC_TIMER_INIT, 0xffffffffu);
	uint64_t t0 = rdtsc();
	while (rdtsc() - t0 < tsc_hz / 1000)
		cpu_relax();
	uint64_t ticks = 0xffffffffu - lapic_read(LAPIC_TIMER_CUR);
	lapic_write(LAPIC_TIMER_INIT, 0);
	lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR);
	return ticks ? ticks : 1000000;
}

/* Halts this vCPU for about `us` microseconds (its timer wakes it; so may any interrupt). */
static void sleep_us(uint64_t us, uint64_t ticks_per_ms)
{
	uint64_t n = us * ticks_per_ms / 1000;
	if (n == 0)
		return;
	if (n > 0xffffffffu)
		n = 0xffffffffu;
	lapic_write(LAPIC_TIMER_INIT, (uint32_t)n);
	__asm__ volatile("sti; hlt; cli" ::: "memory");
}

#define DUTY_PERIOD_US 10000

static uint64_t owed_pages(uint64_t *last, uint64_t now, uint64_t rate, uint64_t tsc_hz)
{
	if (rate == 0)
		return 64;
	uint64_t dt = now - *last;
	if (dt > tsc_hz) /* cap catch-up, e.g. after a pause */
		dt = tsc_hz;
	uint64_t todo = dt * rate / tsc_hz; /* rate <= 1e6 and dt <= tsc_hz: no overflow */
	if (todo)
		*last += todo * tsc_hz / rate;
	if (now - *last > tsc_hz)
		*last = now;
	return todo;
}

void guest_main(struct boot_info *bi, uint64_t cpu)
{
	if (bi->magic != BOOT_MAGIC || cpu >= MAX_CPUS) {
		if (cpu == 0)
			puts_serial("dirtier: bad boot info\n");
		return;
	}
	if (cpu == 0) {
		puts_serial("dirtier: start\n");
		print_cpuid();
	}
	const char *cmdline = (const char *)(uintptr_t)bi->cmdline;
	uint64_t mb = parse_param(cmdline, "mb", 4);
	uint64_t rate = parse_param(cmdline, "rate", 2000);
	if (rate > 1000000)
		rate = 1000000;
	uint64_t beat_ms = parse_param(cmdline, "beat_ms", 200);
	uint64_t reset_after = parse_param(cmdline, "reset_after", 0);
	uint64_t busy = parse_param(cmdline, "busy", 100);
	if (busy > 100)
		busy = 100;
	period = parse_param(cmdline, "period", WORDS);
	if (period == 0 || period > WORDS)
		period = WORDS;
	uint64_t ncpus = bi->nr_cpus ? bi->nr_cpus : 1;
	uint64_t tsc_hz = bi->tsc_khz ? bi->tsc_khz * 1000 : 1000000000ULL;
	uint64_t start = (bi->free_start + PAGE * 512 - 1) & ~(PAGE * 512 - 1); /* 2 MiB aligned */
	uint64_t npages = mb * 256;
	if (start + npages * PAGE > bi->mem_size) {
		if (cpu == 0)
			puts_serial("dirtier: BAD not enough memory for the buffer\n");
		return;
	}
	buffer = (uint8_t *)(uintptr_t)start;

	struct cpu_slot *me = &slots[cpu];
	me->first_page = npages * cpu / ncpus;
	me->npages = npages * (cpu + 1) / ncpus - me->first_page;
	me->pos = 0;
	fill_share(me);
	me->started = 1;

	if (cpu == 0) {
		for (uint64_t c = 1; c < ncpus; c++)
			while (!slots[c].started)
				cpu_relax();
		fill_done = 1;
		puts_serial("dirtier: mb=");
		put_u64(mb);
		puts_serial(" rate=");
		put_u64(rate);
		puts_serial(" cpus=");
		put_u64(ncpus);
		puts_serial(" busy=");
		put_u64(busy);
		puts_serial(" ready\n");
	} else {
		while (!fill_done)
			cpu_relax();
	}

	uint64_t per_cpu_rate = rate / ncpus;
	if (rate && !per_cpu_rate)
		per_cpu_rate = 1;
	uint64_t last = rdtsc();
	uint64_t beat_ticks = tsc_hz / 1000 * beat_ms;
	uint64_t next_beat = last + beat_ticks;
	uint64_t window = 0;
	uint64_t seen_progress[MAX_CPUS] = {0};
	uint64_t stalled[MAX_CPUS] = {0};
	uint64_t ticks_per_ms = busy < 100 ? lapic_timer_init(tsc_hz) : 0;
	uint64_t duty_ticks = tsc_hz / 1000000 * DUTY_PERIOD_US;
	uint64_t work_ticks = duty_ticks / 100 * busy;
	uint64_t duty_start = rdtsc();

	for (;;) {
		uint64_t now = rdtsc();
		dirty_pages(me, owed_pages(&last, now, per_cpu_rate, tsc_hz));
		if (busy < 100 && now - duty_start >= work_ticks) {
			/* The rest of this period halted. */
			uint64_t end = duty_start + duty_ticks;
			if (now < end)
				sleep_us((end - now) * 1000000 / tsc_hz, ticks_per_ms);
			duty_start = end;
			now = rdtsc();
			if (now - duty_start >= duty_ticks)
				duty_start = now;
		}
		if (cpu != 0) {
			cpu_relax();
			continue;
		}
		if (now < next_beat) {
			cpu_relax();
			continue;
		}
		/* vCPU 0: verify everything and report. Other vCPUs may be mid-update of their
		 * own running checksum, so only vCPU 0's share is checked against its checksum;
		 * the pattern check covers every share (byte 0 excluded). */
		const char *bad = 0;
		uint64_t bad_page = UINT64_MAX;
		if (verify_csum(me)) {
			bad = "checksum";
			bad_page = shadow_mismatch(me);
		}
		if (!bad) {
			bad_page = verify_window(window, VERIFY_WINDOW, npages);
			if (bad_page != UINT64_MAX)
				bad = "pattern";
		}
		window = (window + VERIFY_WINDOW) % (npages ? npages : 1);
		for (uint64_t c = 1; c < ncpus && !bad; c++) {
			if (slots[c].progress == seen_progress[c] && per_cpu_rate) {
				if (++stalled[c] >= 25)
					bad = "stalled-cpu";
			} else {
				stalled[c] = 0;
			}
			seen_progress[c] = slots[c].progress;
		}
		puts_serial("beat ");
		put_u64(beat_counter);
		if (bad) {
			puts_serial(" BAD ");
			puts_serial(bad);
			if (bad_page != UINT64_MAX) {
				const uint64_t *w = (const uint64_t *)(buffer + bad_page * PAGE);
				uint64_t word = first_bad_word(bad_page);
				puts_serial(" page=");
				put_u64(bad_page);
				puts_serial(" byte0=");
				put_u64(buffer[bad_page * PAGE]);
				if (bad_page < SHADOW_PAGES) {
					puts_serial(" shadow=");
					put_u64(shadow[bad_page]);
				}
				if (word < WORDS) {
					puts_serial(" word=");
					put_u64(word);
					puts_serial(word < WORDS && w[word] == 0 ? " zero" : " garbled");
				}
			}
			putc_serial('\n');
			/* resynchronise so that one fault is reported once */
			fill_share(me);
		} else {
			puts_serial(" ok\n");
		}
		beat_counter++;
		if (reset_after && beat_counter >= reset_after) {
			puts_serial("dirtier: resetting through the i8042\n");
			outb(0x64, 0xfe);
		}
		next_beat += beat_ticks;
		if (now >= next_beat)
			next_beat = now + beat_ticks;
	}
}
