# Sourced by bench/compare.sh and bench/train-compare.sh: `use_isa native|avx2`.
#
# avx2 makes every engine in the run see an AVX2 + FMA CPU, as on an AVX2-only server (AMD Zen 3,
# Intel before Ice Lake): bench/avx2cap.c, preloaded, makes CPUID fault and answers it with the
# AVX-512/AMX/AVX-VNNI bits cleared, so prefixd's dispatch, PyTorch (MKL, oneDNN), ONNX Runtime's
# MLAS and NumPy all pick their AVX2 kernels from their own detection. glibc's string functions
# are chosen before any preload runs: GLIBC_TUNABLES caps those. PyTorch's own switches are set
# too, belt and braces. Needs the `cpuid_fault` CPU flag (KVM guests have it); without it the
# shim refuses to run rather than report AVX-512 numbers as AVX2 ones.
use_isa() {
  case $1 in
    native) ;;
    avx2)
      grep -qw cpuid_fault /proc/cpuinfo || { echo "--isa avx2 needs the cpuid_fault CPU flag" >&2; exit 1; }
      mkdir -p target
      cc -O2 -Wall -shared -fPIC -o target/avx2cap.so bench/avx2cap.c
      export LD_PRELOAD=$PWD/target/avx2cap.so
      export GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD
      export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
      ;;
    *) echo "--isa native|avx2" >&2; exit 1 ;;
  esac
}
