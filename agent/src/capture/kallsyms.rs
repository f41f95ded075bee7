//! Where a kernel function's code lies, from `/proc/kallsyms`: the filesystem programs
//! tell `ext4_setattr`'s own calls to `ext4_mark_inode_dirty` from every other by the
//! caller address the tracepoint gives.

use anyhow::{bail, Context, Result};

/// `[start, end)` of each function of `names`: from its address to the next symbol's.
/// `/proc/kallsyms` is read once for all of them.
pub fn function_ranges<const N: usize>(names: [&str; N]) -> Result<[(u64, u64); N]> {
    let text = std::fs::read_to_string("/proc/kallsyms").context("cannot read /proc/kallsyms")?;
    ranges_in(&text, names)
}

fn ranges_in<const N: usize>(text: &str, names: [&str; N]) -> Result<[(u64, u64); N]> {
    let mut addrs: Vec<u64> = Vec::new();
    let mut starts = [None; N];
    for line in text.lines() {
        let mut parts = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(sym)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if parts.next().is_some() {
            continue; // a module's symbol: "[module]" follows
        }
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        if let Some(i) = names.iter().position(|&n| n == sym) {
            starts[i] = Some(addr);
        }
        addrs.push(addr);
    }
    addrs.sort_unstable();
    let mut out = [(0, 0); N];
    for (i, name) in names.iter().enumerate() {
        let Some(start) = starts[i].filter(|&a| a != 0) else {
            bail!(
                "the kernel function {name} is not in /proc/kallsyms (addresses hidden by \
                 kptr_restrict, or another kernel): run as root"
            );
        };
        let next = addrs.partition_point(|&a| a <= start);
        let end = *addrs
            .get(next)
            .with_context(|| format!("no symbol follows {name} in /proc/kallsyms"))?;
        out[i] = (start, end);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_ends_where_the_next_symbol_begins() {
        let text = "ffffffff81000000 T _stext\n\
                    ffffffff817ef820 t __pfx_ext4_setattr\n\
                    ffffffff817ef830 T ext4_setattr\n\
                    ffffffff817f0700 T __pfx_ext4_dirty_inode\n\
                    ffffffffc0000000 t some_fn\t[mod]\n";
        assert_eq!(
            ranges_in(text, ["ext4_setattr", "_stext"]).unwrap(),
            [
                (0xffffffff817ef830, 0xffffffff817f0700),
                (0xffffffff81000000, 0xffffffff817ef820)
            ]
        );
        assert!(ranges_in(text, ["ext4_setattr", "nothing"]).is_err());
        let hidden = "0000000000000000 T ext4_setattr\n0000000000000000 T x\n";
        assert!(ranges_in(hidden, ["ext4_setattr"]).is_err());
    }
}
