/*
 * avx2cap: an LD_PRELOAD shim that makes one process see an AVX2 + FMA CPU.
 *
 * Why: the speed goals are stated for AVX2-only servers (AMD Zen 2/3, Intel before Ice Lake),
 * but the machines here have AVX-512. Environment switches cap some engines (PREFIXD_ISA,
 * ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS) but not ONNX Runtime, whose MLAS executes CPUID
 * itself. Linux can make CPUID fault (arch_prctl(ARCH_SET_CPUID, 0), on CPUs and VMs that report
 * the `cpuid_fault` flag); this shim turns that on before the program's own code runs and answers
 * each CPUID from a SIGSEGV handler with the AVX-512, AMX and AVX-VNNI bits cleared. Every library
 * in the process (MLAS, MKL, oneDNN, Rust's std_detect, NumPy) then picks its AVX2 kernels, exactly
 * as on an AVX2-only machine. The setting is inherited by threads and children, reset by execve
 * (the shim, being preloaded, sets it again).
 *
 * Not covered: glibc chooses its memcpy/strlen variants inside ld.so before any preload runs (use
 * GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,... for those: bench/compare.sh does), and XGETBV still
 * reports the AVX-512 register state as enabled, which is harmless since every feature test also
 * needs the CPUID bit.
 *
 * Build: cc -O2 -shared -fPIC -o avx2cap.so bench/avx2cap.c
 * Use:   LD_PRELOAD=$PWD/avx2cap.so program ...
 * With AVX2CAP_VERBOSE=1 it says on stderr that it is active.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static struct sigaction previous;

static void set_cpuid_enabled(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* Clear what an AVX2 + FMA CPU (AMD Zen 3, say) does not have. */
static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8 */
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA */
        r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) {
        int saved_errno = errno;
        uint32_t leaf = (uint32_t)regs[REG_RAX], sub = (uint32_t)regs[REG_RCX], r[4];
        set_cpuid_enabled(1);
        cpuid(leaf, sub, r);
        set_cpuid_enabled(0);
        mask(leaf, sub, r);
        regs[REG_RAX] = r[0];
        regs[REG_RBX] = r[1];
        regs[REG_RCX] = r[2];
        regs[REG_RDX] = r[3];
        regs[REG_RIP] += 2;
        errno = saved_errno;
        return;
    }
    /* A real fault: hand it to whoever had the signal before us, or die as usual. */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
    }
}

__attribute__((constructor)) static void avx2cap_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &previous) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        /* Without CPUID faulting the numbers would silently be AVX-512 ones: refuse to run. */
        fprintf(stderr, "avx2cap: this CPU/kernel cannot fault CPUID (%s); no cpuid_fault flag?\n",
                strerror(errno));
        _exit(97);
    }
    if (getenv("AVX2CAP_VERBOSE")) fprintf(stderr, "avx2cap: CPUID capped at AVX2 + FMA\n");
}
