//! CPUID: what the guest is told about its processor, and whether a host can give a guest
//! everything it was told before (restore, and later migration).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors of CPUID handling.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM refused to list its supported CPUID.
    #[error("cannot read the CPUID KVM supports")]
    Supported(#[source] kvm_ioctls::Error),
    /// Too many entries.
    #[error("CPUID has too many entries ({0})")]
    TooMany(usize),
    /// An unknown CPU model name.
    #[error(
        "unknown CPU model {0:?}: use host, compat, x86-64-v1, x86-64-v2, x86-64-v3 or x86-64-v4"
    )]
    UnknownModel(String),
    /// An unknown feature name (in a host's hide list).
    #[error("unknown CPU feature {0:?}; known features: {known}", known = FEATURES.iter().map(|f| f.4).collect::<Vec<_>>().join(" "))]
    UnknownFeature(String),
}

/// What a VM is told about its processor: the CPU model of its config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuModel {
    /// Everything this host's KVM offers (minus what the host hides): fastest, but the VM
    /// can move only to hosts with at least the same features.
    #[default]
    #[serde(rename = "host")]
    Host,
    /// Processor compatibility mode: a fixed set that every x86-64 processor of one vendor
    /// from the last fifteen years has (no SSE4.x, POPCNT, AES, XSAVE/AVX, AVX-512, BMI,
    /// SHA, ...), so the VM can move between generations.
    #[serde(rename = "compat")]
    Compat,
    /// x86-64 baseline (psABI level 1).
    #[serde(rename = "x86-64-v1")]
    V1,
    /// + CX16, LAHF, POPCNT, SSE3, SSE4.1, SSE4.2, SSSE3 (Nehalem, Bulldozer).
    #[serde(rename = "x86-64-v2")]
    V2,
    /// + AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE (Haswell, Excavator).
    #[serde(rename = "x86-64-v3")]
    V3,
    /// + AVX-512 F, BW, CD, DQ, VL (Skylake-X, Zen 4).
    #[serde(rename = "x86-64-v4")]
    V4,
}

/// Features every model promises: the architectural x86-64 baseline.
const BASELINE: &[&str] = &[
    "fpu", "tsc", "msr", "cx8", "apic", "cmov", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall",
    "nx", "lm",
];
/// Platform features a model passes through when the host has them, without promising them:
/// the interrupt controller and timer modes KVM provides in software (x2APIC, TSC-deadline).
const PLATFORM: &[&str] = &["x2apic", "tsc-deadline"];
const V2_ADDS: &[&str] = &[
    "cx16", "lahf-lm", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3",
];
const V3_ADDS: &[&str] = &[
    "avx",
    "avx2",
    "bmi1",
    "bmi2",
    "f16c",
    "fma",
    "abm-lzcnt",
    "movbe",
    "xsave",
];
const V4_ADDS: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];
const COMPAT_ADDS: &[&str] = &["cx16", "lahf-lm", "sse3", "ssse3"];

/// Registers that hold only instruction-set extensions: under a model, a bit there survives
/// only if the model names it (so features newer than this table are hidden too).
/// (leaf, subleaf, register)
const EXTENSION_REGS: &[(u32, u32, u8)] = &[
    (1, 0, 2),
    (7, 0, 1),
    (7, 0, 2),
    (7, 1, 0),
    (0xd, 1, 0),
    (0x8000_0001, 0, 2),
];

/// Leaf 7 EDX mixes extensions with the speculation-control bits a guest needs for its
/// mitigations; under a model only these extension bits are cleared there
/// (AVX512_4VNNIW, AVX512_4FMAPS, FSRM, VP2INTERSECT, SERIALIZE, HYBRID, TSXLDTRK, AMX-BF16,
/// AVX512_FP16, AMX-TILE, AMX-INT8).
const LEAF7_EDX_EXTENSIONS: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 8)
    | (1 << 14)
    | (1 << 15)
    | (1 << 16)
    | (1 << 22)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25);

impl CpuModel {
    /// Every model, in order.
    pub const ALL: [CpuModel; 6] = [
        CpuModel::Host,
        CpuModel::Compat,
        CpuModel::V1,
        CpuModel::V2,
        CpuModel::V3,
        CpuModel::V4,
    ];

    /// The model's name, as in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Host => "host",
            CpuModel::Compat => "compat",
            CpuModel::V1 => "x86-64-v1",
            CpuModel::V2 => "x86-64-v2",
            CpuModel::V3 => "x86-64-v3",
            CpuModel::V4 => "x86-64-v4",
        }
    }

    /// Parses a model name.
    pub fn parse(s: &str) -> Result<CpuModel, CpuidError> {
        CpuModel::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| CpuidError::UnknownModel(s.to_string()))
    }

    /// The named features a guest of this model may see (`None`: whatever the host has).
    pub fn allowed(self) -> Option<Vec<&'static str>> {
        let mut v = self.promised()?;
        v.extend_from_slice(PLATFORM);
        Some(v)
    }

    /// The named features a host must have to run guests of this model (`None`: host).
    pub fn promised(self) -> Option<Vec<&'static str>> {
        let adds: &[&[&str]] = match self {
            CpuModel::Host => return None,
            CpuModel::Compat => &[COMPAT_ADDS],
            CpuModel::V1 => &[],
            CpuModel::V2 => &[V2_ADDS],
            CpuModel::V3 => &[V2_ADDS, V3_ADDS],
            CpuModel::V4 => &[V2_ADDS, V3_ADDS, V4_ADDS],
        };
        let mut v = BASELINE.to_vec();
        for a in adds {
            v.extend_from_slice(a);
        }
        Some(v)
    }
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// XSAVE state components (XCR0 bits) a guest may enable: x87 and SSE always, AVX with
/// `avx`, the three AVX-512 components with `avx512f`, PKRU with `pku`; nothing else (MPX,
/// AMX, ...: components of features Ferry cannot check across hosts).
fn allowed_xcr0(features: &[&str]) -> u64 {
    let mut x = 0b11;
    if features.contains(&"avx") {
        x |= 1 << 2;
    }
    if features.contains(&"avx512f") {
        x |= 0b111 << 5;
    }
    if features.contains(&"pku") {
        x |= 1 << 9;
    }
    x
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: u8) -> &mut u32 {
    match r {
        0 => &mut e.eax,
        1 => &mut e.ebx,
        2 => &mut e.ecx,
        _ => &mut e.edx,
    }
}

fn matches(e: &kvm_cpuid_entry2, function: u32, index: u32) -> bool {
    e.function == function && (e.index == index || e.flags & 1 == 0)
}

/// Whether `name` is a feature Ferry knows.
pub fn is_feature(name: &str) -> bool {
    FEATURES.iter().any(|f| f.4 == name)
}

/// Hides the named features in `entries` (a host's hide list).
pub fn hide(entries: &mut [kvm_cpuid_entry2], names: &[String]) -> Result<(), CpuidError> {
    for n in names {
        let f = FEATURES
            .iter()
            .find(|f| f.4 == n)
            .ok_or_else(|| CpuidError::UnknownFeature(n.clone()))?;
        for e in entries.iter_mut().filter(|e| matches(e, f.0, f.1)) {
            *reg_mut(e, f.2) &= !(1 << f.3);
        }
    }
    if names.iter().any(|n| n == "xsave") {
        restrict_xsave(entries, 0);
    } else if names.iter().any(|n| n == "avx") {
        restrict_xsave(entries, !(1u64 << 2) & !(0b111 << 5));
    } else if names.iter().any(|n| n == "avx512f") {
        restrict_xsave(entries, !(0b111u64 << 5));
    }
    Ok(())
}

/// Limits the XSAVE components the guest is offered to `keep` (0: no XSAVE at all). KVM
/// derives the XCR0 values a guest may set from leaf 0xD, so a hidden component cannot be
/// enabled with XSETBV.
fn restrict_xsave(entries: &mut [kvm_cpuid_entry2], keep: u64) {
    if keep & 0b11 == 0 || keep == 0 {
        for e in entries.iter_mut() {
            if e.function == 1 {
                e.ecx &= !((1 << 26) | (1 << 27)); // XSAVE, OSXSAVE
            }
            if e.function == 0xd {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
        return;
    }
    // Sizes and offsets of the components that stay (subleaf i: size EAX, offset EBX).
    let mut end = 576u32; // legacy area + header
    let comps: Vec<(u32, u32, u32)> = entries
        .iter()
        .filter(|e| e.function == 0xd && e.index >= 2 && e.index < 64)
        .map(|e| (e.index, e.eax, e.ebx))
        .collect();
    for (i, size, off) in comps {
        if keep >> i & 1 == 1 {
            end = end.max(off.saturating_add(size));
        }
    }
    for e in entries.iter_mut().filter(|e| e.function == 0xd) {
        match e.index {
            0 => {
                e.eax &= keep as u32;
                e.edx &= (keep >> 32) as u32;
                e.ecx = end;
                e.ebx = e.ebx.min(end);
            }
            1 => {}
            i if i < 64 && keep >> i & 1 == 0 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// The features `model` promises that a host offering `entries` lacks (empty: the host can
/// run guests of that model).
pub fn model_missing(entries: &[kvm_cpuid_entry2], model: CpuModel) -> Vec<&'static str> {
    let has = feature_names(entries);
    model
        .promised()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| !has.contains(f))
        .collect()
}

/// Applies `model` to the CPUID `entries` of a host: hides everything the model does not
/// name (see [`CpuModel`]), including the matching XSAVE components.
pub fn apply_model(entries: &mut [kvm_cpuid_entry2], model: CpuModel) {
    let Some(allowed) = model.allowed() else {
        // `host`: keep every feature, but offer only XSAVE components whose features the
        // guest is told about (KVM may list components, e.g. AVX-512's, whose CPUID bits it
        // does not offer; Linux then finds the sizes inconsistent and disables XSAVE
        // features altogether).
        restrict_to_present_xsave(entries);
        return;
    };
    let allowed_bit = |f: u32, i: u32, r: u8, b: u8| {
        FEATURES
            .iter()
            .any(|x| x.0 == f && x.1 == i && x.2 == r && x.3 == b && allowed.contains(&x.4))
    };
    for e in entries.iter_mut() {
        for &(f, i, r) in EXTENSION_REGS {
            if matches(e, f, i) {
                let mut keep = 0u32;
                for b in 0..32u8 {
                    if allowed_bit(f, i, r, b) {
                        keep |= 1 << b;
                    }
                }
                if (f, r) == (1, 2) {
                    keep |= 1 << 31; // hypervisor present
                    if allowed.contains(&"xsave") {
                        keep |= 1 << 27; // OSXSAVE mirrors CR4
                    }
                }
                *reg_mut(e, r) &= keep;
            }
        }
        if matches(e, 7, 0) {
            e.edx &= !LEAF7_EDX_EXTENSIONS;
        }
        // Registers outside EXTENSION_REGS: clear only the named features not allowed.
        for x in FEATURES.iter().filter(|x| !allowed.contains(&x.4)) {
            if matches(e, x.0, x.1) && !EXTENSION_REGS.contains(&(x.0, x.1, x.2)) {
                *reg_mut(e, x.2) &= !(1 << x.3);
            }
        }
    }
    restrict_to_present_xsave(entries);
}

/// XSAVE components follow the features the guest sees.
fn restrict_to_present_xsave(entries: &mut [kvm_cpuid_entry2]) {
    let present = feature_names(entries);
    if present.contains(&"xsave") {
        restrict_xsave(entries, allowed_xcr0(&present));
    } else {
        restrict_xsave(entries, 0);
    }
}

/// Named feature bits checked before a guest is brought to a host: (leaf, subleaf, register,
/// bit, name). Register: 0 = EAX, 1 = EBX, 2 = ECX, 3 = EDX.
pub const FEATURES: &[(u32, u32, u8, u8, &str)] = &[
    (1, 0, 3, 0, "fpu"),
    (1, 0, 3, 4, "tsc"),
    (1, 0, 3, 5, "msr"),
    (1, 0, 3, 8, "cx8"),
    (1, 0, 3, 9, "apic"),
    (1, 0, 3, 15, "cmov"),
    (1, 0, 3, 19, "clflush"),
    (1, 0, 3, 23, "mmx"),
    (1, 0, 3, 24, "fxsr"),
    (1, 0, 3, 25, "sse"),
    (1, 0, 3, 26, "sse2"),
    (1, 0, 2, 0, "sse3"),
    (1, 0, 2, 1, "pclmulqdq"),
    (1, 0, 2, 9, "ssse3"),
    (1, 0, 2, 12, "fma"),
    (1, 0, 2, 13, "cx16"),
    (1, 0, 2, 19, "sse4.1"),
    (1, 0, 2, 20, "sse4.2"),
    (1, 0, 2, 21, "x2apic"),
    (1, 0, 2, 22, "movbe"),
    (1, 0, 2, 23, "popcnt"),
    (1, 0, 2, 24, "tsc-deadline"),
    (1, 0, 2, 25, "aes"),
    (1, 0, 2, 26, "xsave"),
    (1, 0, 2, 28, "avx"),
    (1, 0, 2, 29, "f16c"),
    (1, 0, 2, 30, "rdrand"),
    (7, 0, 1, 0, "fsgsbase"),
    (7, 0, 1, 3, "bmi1"),
    (7, 0, 1, 5, "avx2"),
    (7, 0, 1, 7, "smep"),
    (7, 0, 1, 8, "bmi2"),
    (7, 0, 1, 9, "erms"),
    (7, 0, 1, 10, "invpcid"),
    (7, 0, 1, 16, "avx512f"),
    (7, 0, 1, 17, "avx512dq"),
    (7, 0, 1, 18, "rdseed"),
    (7, 0, 1, 19, "adx"),
    (7, 0, 1, 20, "smap"),
    (7, 0, 1, 23, "clflushopt"),
    (7, 0, 1, 24, "clwb"),
    (7, 0, 1, 28, "avx512cd"),
    (7, 0, 1, 29, "sha"),
    (7, 0, 1, 30, "avx512bw"),
    (7, 0, 1, 31, "avx512vl"),
    (7, 0, 2, 1, "avx512vbmi"),
    (7, 0, 2, 2, "umip"),
    (7, 0, 2, 3, "pku"),
    (7, 0, 2, 8, "gfni"),
    (7, 0, 2, 9, "vaes"),
    (7, 0, 2, 10, "vpclmulqdq"),
    (7, 0, 2, 22, "rdpid"),
    (0xd, 1, 0, 0, "xsaveopt"),
    (0xd, 1, 0, 1, "xsavec"),
    (0xd, 1, 0, 3, "xsaves"),
    (0x8000_0001, 0, 2, 0, "lahf-lm"),
    (0x8000_0001, 0, 2, 5, "abm-lzcnt"),
    (0x8000_0001, 0, 2, 6, "sse4a"),
    (0x8000_0001, 0, 2, 8, "prefetchw"),
    (0x8000_0001, 0, 3, 11, "syscall"),
    (0x8000_0001, 0, 3, 20, "nx"),
    (0x8000_0001, 0, 3, 26, "pdpe1gb"),
    (0x8000_0001, 0, 3, 27, "rdtscp"),
    (0x8000_0001, 0, 3, 29, "lm"),
];

/// The CPUID KVM can give guests on this host.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

fn entry(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && (e.index == index || e.flags & 1 == 0))
}

fn reg(e: &kvm_cpuid_entry2, r: u8) -> u32 {
    match r {
        0 => e.eax,
        1 => e.ebx,
        2 => e.ecx,
        _ => e.edx,
    }
}

/// The 12-character vendor string of leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> String {
    entry(entries, 0, 0)
        .map(|e| {
            let mut b = Vec::with_capacity(12);
            b.extend_from_slice(&e.ebx.to_le_bytes());
            b.extend_from_slice(&e.edx.to_le_bytes());
            b.extend_from_slice(&e.ecx.to_le_bytes());
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default()
}

/// Names of the known features `entries` advertises.
pub fn feature_names(entries: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|(f, i, r, b, _)| entry(entries, *f, *i).is_some_and(|e| reg(e, *r) >> b & 1 == 1))
        .map(|f| f.4)
        .collect()
}

/// Names of the known features set in one CPUID register value (register: 0 = EAX ...
/// 3 = EDX), e.g. to read what a guest printed.
pub fn names_in(leaf: u32, subleaf: u32, reg: u8, value: u32) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| f.0 == leaf && f.1 == subleaf && f.2 == reg && value >> f.3 & 1 == 1)
        .map(|f| f.4)
        .collect()
}

/// Why a guest that saw `guest` cannot run on a host offering `host`: a vendor mismatch and the
/// list of features it saw that the host lacks. Empty when it can.
pub fn incompatibilities(guest: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut out = Vec::new();
    let (gv, hv) = (vendor(guest), vendor(host));
    if gv != hv {
        out.push(format!("CPU vendor {gv:?} (host is {hv:?})"));
    }
    let host_has = feature_names(host);
    for name in feature_names(guest) {
        if !host_has.contains(&name) {
            out.push(format!("feature {name}"));
        }
    }
    out
}

/// The CPUID vCPU `id` of `count` gets: KVM's supported set with the topology and the
/// hypervisor bit filled in.
pub fn for_vcpu(supported: &CpuId, id: u8, count: u8) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count above is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooMany(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_hide_what_they_do_not_name() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(_) => return,
        };
        let host = supported(&kvm).unwrap();
        let host_names = feature_names(host.as_slice());
        for model in CpuModel::ALL {
            let mut e = host.as_slice().to_vec();
            apply_model(&mut e, model);
            let seen = feature_names(&e);
            match model.allowed() {
                None => assert_eq!(seen, host_names),
                Some(allowed) => {
                    // Exactly the model's features that the host has.
                    let want: Vec<_> = host_names
                        .iter()
                        .copied()
                        .filter(|n| allowed.contains(n))
                        .collect();
                    assert_eq!(seen, want, "{model}");
                    let xcr0 = e
                        .iter()
                        .find(|x| x.function == 0xd && x.index == 0)
                        .map_or(0, |x| u64::from(x.eax) | (u64::from(x.edx) << 32));
                    if !seen.contains(&"avx") {
                        assert_eq!(xcr0 & (1 << 2), 0, "{model}: AVX state still offered");
                    }
                    if !seen.contains(&"xsave") {
                        assert_eq!(xcr0, 0, "{model}");
                    }
                }
            }
            // Masking is idempotent and a model's guest fits on its own host.
            let once = e.clone();
            apply_model(&mut e, model);
            assert_eq!(feature_names(&e), feature_names(&once));
            assert!(incompatibilities(&e, host.as_slice()).is_empty());
        }
        assert!(CpuModel::parse("x86-64-v9").is_err());
        assert_eq!(CpuModel::parse("compat").unwrap(), CpuModel::Compat);
    }

    #[test]
    fn a_host_hide_list_is_checked() {
        let mut e = vec![leaf(1, 0, (1 << 28) | (1 << 26), 1)];
        hide(&mut e, &["avx".into()]).unwrap();
        assert_eq!(e[0].ecx & (1 << 28), 0);
        assert!(matches!(
            hide(&mut e, &["avx3".into()]),
            Err(CpuidError::UnknownFeature(_))
        ));
    }

    fn leaf(function: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn missing_features_and_vendor_are_named() {
        let amd = leaf(
            0,
            u32::from_le_bytes(*b"Auth"),
            u32::from_le_bytes(*b"cAMD"),
            u32::from_le_bytes(*b"enti"),
        );
        let intel = leaf(
            0,
            u32::from_le_bytes(*b"Genu"),
            u32::from_le_bytes(*b"ntel"),
            u32::from_le_bytes(*b"ineI"),
        );
        let guest = vec![amd, leaf(1, 0, (1 << 28) | (1 << 20), 1)];
        let poorer = vec![amd, leaf(1, 0, 1 << 20, 1)];
        assert_eq!(vendor(&guest), "AuthenticAMD");
        assert!(incompatibilities(&guest, &guest).is_empty());
        assert_eq!(
            incompatibilities(&guest, &poorer),
            vec!["feature avx".to_string()]
        );
        let other = vec![intel, leaf(1, 0, (1 << 28) | (1 << 20), 1)];
        assert!(incompatibilities(&guest, &other)[0].contains("GenuineIntel"));
    }

    #[test]
    fn vcpu_topology_is_filled_in() {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(_) => return, // no /dev/kvm: covered by the integration tests' skip rule
        };
        let sup = supported(&kvm).unwrap();
        let c = for_vcpu(&sup, 3, 4).unwrap();
        let l1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!(l1.ecx >> 31, 1);
    }
}
