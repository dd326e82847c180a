//! Which x86 vector instructions our kernels may use: what the CPU has, capped by
//! `PREFIXD_ISA` (`avx2`, `avx512`, `baseline`; unset or `native` = all the CPU has).
//!
//! Why a cap: most x86 servers people rent are AVX2-only, while development machines often have
//! AVX-512. With `PREFIXD_ISA=avx2` an AVX-512 machine runs exactly the code an AVX2 machine
//! would (every kernel of ours, the matrix multiplications included), so both classes can be
//! measured on one machine (`bench/compare.sh --isa avx2`).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// SSE2 only: what every x86-64 has (and every other architecture gets).
    Baseline,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "baseline" | "sse2" => Some(Self::Baseline),
            "avx2" => Some(Self::Avx2),
            "avx512" | "avx512f" => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// What this CPU supports.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// What our kernels use: the CPU's, capped by `PREFIXD_ISA`. Read once per process.
pub fn active() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let cpu = detected();
        match std::env::var("PREFIXD_ISA") {
            Ok(v) if v.eq_ignore_ascii_case("native") || v.is_empty() => cpu,
            Ok(v) => match Isa::parse(&v) {
                Some(cap) => cap.min(cpu),
                None => {
                    tracing::warn!(value = %v, "PREFIXD_ISA: expected avx2, avx512, baseline or native; ignored");
                    cpu
                }
            },
            Err(_) => cpu,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_and_order() {
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("avx512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("neon"), None);
        assert!(Isa::Avx512 > Isa::Avx2 && Isa::Avx2 > Isa::Baseline);
        assert!(active() <= detected());
    }
}
