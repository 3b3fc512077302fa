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
    (7, 0, 2, 4, "ospke-pku"),
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
