//! Where a kernel function's code lies, from `/proc/kallsyms`: the filesystem programs
//! tell `ext4_setattr`'s own calls to `ext4_mark_inode_dirty` from every other by the
//! caller address the tracepoint gives.

use anyhow::{bail, Context, Result};

/// `[start, end)` of function `name`: from its address to the next symbol's.
pub fn function_range(name: &str) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/kallsyms").context("cannot read /proc/kallsyms")?;
    range_in(&text, name)
}

fn range_in(text: &str, name: &str) -> Result<(u64, u64)> {
    let mut addrs: Vec<u64> = Vec::new();
    let mut start = None;
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
        if sym == name {
            start = Some(addr);
        }
        addrs.push(addr);
    }
    let Some(start) = start.filter(|&a| a != 0) else {
        bail!(
            "the kernel function {name} is not in /proc/kallsyms (addresses hidden by \
             kptr_restrict, or another kernel): run as root"
        );
    };
    let end = addrs
        .iter()
        .copied()
        .filter(|&a| a > start)
        .min()
        .context("no symbol follows it")?;
    Ok((start, end))
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
            range_in(text, "ext4_setattr").unwrap(),
            (0xffffffff817ef830, 0xffffffff817f0700)
        );
        assert!(range_in(text, "nothing").is_err());
        let hidden = "0000000000000000 T ext4_setattr\n0000000000000000 T x\n";
        assert!(range_in(hidden, "ext4_setattr").is_err());
    }
}
