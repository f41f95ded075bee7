//! Kernel structure offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The eBPF program is written in Rust, which gets no CO-RE relocations, so every field
//! it reads is located here at load time and handed to it as a global. This is a small,
//! self-contained reader of the BTF format (header, type section, string section): it
//! only needs struct/union members and the modifiers that can sit between them.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    /// Offset of the name in the string section.
    name: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct/union.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// Struct or union.
    Composite {
        size: u32,
        members: Vec<Member>,
    },
    /// typedef / const / volatile / restrict / type tag: points at another type.
    Alias(u32),
    /// Anything with a size we may want (int, ptr, enum, float).
    Sized(u32),
    Other,
}

/// Parsed vmlinux BTF, reduced to what offset lookups need. Names stay offsets into
/// the string section until asked for: vmlinux has hundreds of thousands of members
/// and enumerators, and making a String of each was most of the agent's start-up.
pub struct Btf {
    types: Vec<Type>,
    by_name: HashMap<String, u32>,
    /// Enumerators of every enum (C gives them one global namespace), as (name offset,
    /// value), in BTF order.
    enumerators: Vec<(u32, i64)>,
    strings: Vec<u8>,
}

fn u16_at(d: &[u8], at: usize) -> Result<u16> {
    let b = d.get(at..at + 2).context("BTF data truncated")?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32> {
    let b = d.get(at..at + 4).context("BTF data truncated")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The NUL-terminated string at `off` (without its NUL).
fn bytes_at(strings: &[u8], off: u32) -> Result<&[u8]> {
    let s = strings
        .get(off as usize..)
        .context("BTF string offset out of range")?;
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    Ok(&s[..end])
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        let data = std::fs::read(VMLINUX_BTF).with_context(|| {
            format!(
                "cannot read {VMLINUX_BTF}: doppel needs a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y (and sysfs mounted at /sys)"
            )
        })?;
        Self::parse(&data).with_context(|| format!("cannot parse {VMLINUX_BTF}"))
    }

    /// Parses raw (little-endian) BTF.
    pub fn parse(d: &[u8]) -> Result<Self> {
        if u16_at(d, 0)? != BTF_MAGIC {
            bail!("not little-endian BTF (bad magic)");
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = u32_at(d, 16)? as usize;
        let str_len = u32_at(d, 20)? as usize;
        let section = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some(s..s.checked_add(len)?))
                .and_then(|r| d.get(r))
                .context("BTF section out of range")
        };
        let tsec = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;

        // Type ids start at 1; id 0 is void.
        let mut types = vec![Type::Other];
        let mut by_name = HashMap::new();
        let mut enumerators = Vec::new();
        let mut at = 0usize;
        while at < tsec.len() {
            let name_off = u32_at(tsec, at)?;
            let info = u32_at(tsec, at + 4)?;
            let size_or_type = u32_at(tsec, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            let ty = match kind {
                KIND_INT => {
                    at += 4;
                    Type::Sized(size_or_type)
                }
                KIND_PTR => Type::Sized(8),
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let m_name = u32_at(tsec, at)?;
                        let m_type = u32_at(tsec, at + 4)?;
                        let m_off = u32_at(tsec, at + 8)?;
                        at += 12;
                        bytes_at(strings, m_name)?;
                        members.push(Member {
                            name: m_name,
                            type_id: m_type,
                            // With kind_flag, the top 8 bits hold a bitfield size.
                            bit_offset: if kind_flag { m_off & 0xff_ffff } else { m_off },
                        });
                    }
                    let name = bytes_at(strings, name_off)?;
                    if !name.is_empty() {
                        // Keep the first complete definition of a name.
                        by_name
                            .entry(String::from_utf8_lossy(name).into_owned())
                            .or_insert(types.len() as u32);
                    }
                    Type::Composite {
                        size: size_or_type,
                        members,
                    }
                }
                KIND_ENUM => {
                    for _ in 0..vlen {
                        let name = u32_at(tsec, at)?;
                        bytes_at(strings, name)?;
                        let value = u32_at(tsec, at + 4)?;
                        // Signedness is in kind_flag; a negative value never names an op.
                        let value = if kind_flag {
                            i64::from(value as i32)
                        } else {
                            i64::from(value)
                        };
                        enumerators.push((name, value));
                        at += 8;
                    }
                    Type::Sized(size_or_type)
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let name = u32_at(tsec, at)?;
                        bytes_at(strings, name)?;
                        let lo = u32_at(tsec, at + 4)?;
                        let hi = u32_at(tsec, at + 8)?;
                        enumerators.push((name, (u64::from(hi) << 32 | u64::from(lo)) as i64));
                        at += 12;
                    }
                    Type::Sized(size_or_type)
                }
                KIND_FWD | KIND_FUNC => Type::Other,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                KIND_FUNC_PROTO => {
                    at += 8 * vlen;
                    Type::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_DATASEC => {
                    at += 12 * vlen;
                    Type::Other
                }
                KIND_FLOAT => Type::Sized(size_or_type),
                other => bail!("unknown BTF kind {other}"),
            };
            types.push(ty);
        }
        Ok(Self {
            types,
            by_name,
            enumerators,
            strings: strings.to_vec(),
        })
    }

    /// The name at string offset `off` (checked when parsed).
    fn name(&self, off: u32) -> &[u8] {
        bytes_at(&self.strings, off).unwrap_or_default()
    }

    /// Value of the enumerator `name` (e.g. `IORING_OP_WRITE`); the first one of that
    /// name if several enums define it.
    pub fn enum_value(&self, name: &str) -> Result<i64> {
        self.enumerators
            .iter()
            .find(|(off, _)| self.name(*off) == name.as_bytes())
            .map(|(_, value)| *value)
            .with_context(|| format!("enumerator {name} is not in the kernel's BTF"))
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias(next) => id = *next,
                t => return Some(t),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        match self.resolve(id)? {
            Type::Composite { size, .. } => Some(*size),
            Type::Sized(s) => Some(*s),
            _ => None,
        }
    }

    /// Finds `name` among the members of composite `id`, looking through anonymous
    /// structs/unions. Returns (byte offset, member type id).
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<(u64, u32)> {
        if depth > 8 {
            return None;
        }
        let Type::Composite { members, .. } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            if self.name(m.name) == name.as_bytes() {
                return Some((u64::from(m.bit_offset / 8), m.type_id));
            }
        }
        for m in members.iter().filter(|m| self.name(m.name).is_empty()) {
            if let Some((off, ty)) = self.find_member(m.type_id, name, depth + 1) {
                return Some((u64::from(m.bit_offset / 8) + off, ty));
            }
        }
        None
    }

    /// Byte offset and size of `path` (e.g. `"f_path.dentry"`) inside `struct strukt`.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<(u64, u32)> {
        let mut id = *self
            .by_name
            .get(strukt)
            .with_context(|| format!("struct {strukt} is not in the kernel's BTF"))?;
        let mut total = 0u64;
        for part in path.split('.') {
            let (off, ty) = self.find_member(id, part, 0).with_context(|| {
                format!("struct {strukt} has no field {path} in the kernel's BTF")
            })?;
            total += off;
            id = ty;
        }
        let size = self
            .size_of(id)
            .with_context(|| format!("cannot size field {strukt}.{path} from BTF"))?;
        Ok((total, size))
    }
}

/// One global of the eBPF program and where its value comes from.
struct Field {
    global: &'static str,
    strukt: &'static str,
    path: &'static str,
    /// Size the program reads this field with (bytes).
    size: u32,
    /// When absent from BTF, hand the program `u64::MAX` ("unknown") instead of failing.
    optional: bool,
}

const fn f(global: &'static str, strukt: &'static str, path: &'static str, size: u32) -> Field {
    Field {
        global,
        strukt,
        path,
        size,
        optional: false,
    }
}

/// Every offset the program reads. Names must match ebpf/src/kernel.rs `offsets!`.
const FIELDS: &[Field] = &[
    f("OFF_TASK_FILES", "task_struct", "files", 8),
    f("OFF_TASK_FS", "task_struct", "fs", 8),
    Field {
        global: "OFF_TASK_TI_STATUS",
        strukt: "task_struct",
        path: "thread_info.status",
        size: 4,
        optional: true,
    },
    f("OFF_FILES_FDT", "files_struct", "fdt", 8),
    f("OFF_FDT_FD", "fdtable", "fd", 8),
    f("OFF_FILE_F_POS", "file", "f_pos", 8),
    f("OFF_FILE_F_FLAGS", "file", "f_flags", 4),
    f("OFF_FILE_F_INODE", "file", "f_inode", 8),
    f("OFF_FILE_DENTRY", "file", "f_path.dentry", 8),
    f("OFF_DENTRY_D_PARENT", "dentry", "d_parent", 8),
    f("OFF_DENTRY_D_INODE", "dentry", "d_inode", 8),
    f("OFF_INODE_I_INO", "inode", "i_ino", 8),
    f("OFF_INODE_I_SB", "inode", "i_sb", 8),
    f("OFF_INODE_I_MODE", "inode", "i_mode", 2),
    f("OFF_INODE_I_SIZE", "inode", "i_size", 8),
    f("OFF_INODE_I_NLINK", "inode", "i_nlink", 4),
    f("OFF_SB_S_DEV", "super_block", "s_dev", 4),
    f("OFF_FS_PWD_DENTRY", "fs_struct", "pwd.dentry", 8),
    f("OFF_REGS_DI", "pt_regs", "di", 8),
    f("OFF_REGS_SI", "pt_regs", "si", 8),
    f("OFF_REGS_DX", "pt_regs", "dx", 8),
    f("OFF_REGS_R10", "pt_regs", "r10", 8),
    f("OFF_REGS_R8", "pt_regs", "r8", 8),
    f("OFF_REGS_R9", "pt_regs", "r9", 8),
    f("OFF_REGS_ORIG_AX", "pt_regs", "orig_ax", 8),
];

/// What the io_uring programs read (ebpf/src/uring.rs). Sizes of 0 are not checked
/// (a struct the program only takes the address of).
const URING_FIELDS: &[Field] = &[
    f("OFF_REQ_FILE", "io_kiocb", "file", 8),
    f("OFF_REQ_CMD", "io_kiocb", "cmd", 0),
    f("OFF_REQ_OPCODE", "io_kiocb", "opcode", 1),
    f("OFF_REQ_RES", "io_kiocb", "cqe.res", 4),
    f("OFF_RW_POS", "io_rw", "kiocb.ki_pos", 8),
    f("OFF_SPLICE_OFF_OUT", "io_splice", "off_out", 8),
    f("OFF_SYNC_LEN", "io_sync", "len", 8),
    f("OFF_SYNC_OFF", "io_sync", "off", 8),
    f("OFF_SYNC_MODE", "io_sync", "mode", 4),
    f("OFF_FTRUNC_LEN", "io_ftrunc", "len", 8),
    f("OFF_OPEN_FLAGS", "io_open", "how.flags", 8),
    f("OFF_OPEN_SLOT", "io_open", "file_slot", 4),
    f("OFF_RENAME_OLD_DFD", "io_rename", "old_dfd", 4),
    f("OFF_RENAME_NEW_DFD", "io_rename", "new_dfd", 4),
    f("OFF_RENAME_OLDPATH", "io_rename", "oldpath", 8),
    f("OFF_RENAME_NEWPATH", "io_rename", "newpath", 8),
    f("OFF_RENAME_FLAGS", "io_rename", "flags", 4),
    f("OFF_UNLINK_DFD", "io_unlink", "dfd", 4),
    f("OFF_UNLINK_FLAGS", "io_unlink", "flags", 4),
    f("OFF_UNLINK_NAME", "io_unlink", "filename", 8),
    f("OFF_MKDIR_DFD", "io_mkdir", "dfd", 4),
    f("OFF_MKDIR_MODE", "io_mkdir", "mode", 2),
    f("OFF_MKDIR_NAME", "io_mkdir", "filename", 8),
    f("OFF_LINK_OLD_DFD", "io_link", "old_dfd", 4),
    f("OFF_LINK_NEW_DFD", "io_link", "new_dfd", 4),
    f("OFF_LINK_OLDPATH", "io_link", "oldpath", 8),
    f("OFF_LINK_NEWPATH", "io_link", "newpath", 8),
    f("OFF_LINK_FLAGS", "io_link", "flags", 4),
    f("OFF_FILENAME_NAME", "filename", "name", 8),
    f("OFF_XATTR_NAME", "io_xattr", "filename", 8),
];

/// io_uring opcodes the program handles: (global, enumerator, required). Ops added in
/// later kernels than io_uring itself are optional.
const URING_OPS: &[(&str, &str, bool)] = &[
    ("URING_OP_WRITE", "IORING_OP_WRITE", true),
    ("URING_OP_WRITEV", "IORING_OP_WRITEV", true),
    ("URING_OP_WRITE_FIXED", "IORING_OP_WRITE_FIXED", true),
    ("URING_OP_WRITEV_FIXED", "IORING_OP_WRITEV_FIXED", false),
    ("URING_OP_SPLICE", "IORING_OP_SPLICE", false),
    ("URING_OP_FALLOCATE", "IORING_OP_FALLOCATE", false),
    ("URING_OP_FTRUNCATE", "IORING_OP_FTRUNCATE", false),
    ("URING_OP_OPENAT", "IORING_OP_OPENAT", false),
    ("URING_OP_OPENAT2", "IORING_OP_OPENAT2", false),
    ("URING_OP_RENAMEAT", "IORING_OP_RENAMEAT", false),
    ("URING_OP_UNLINKAT", "IORING_OP_UNLINKAT", false),
    ("URING_OP_MKDIRAT", "IORING_OP_MKDIRAT", false),
    ("URING_OP_SYMLINKAT", "IORING_OP_SYMLINKAT", false),
    ("URING_OP_LINKAT", "IORING_OP_LINKAT", false),
    ("URING_OP_SETXATTR", "IORING_OP_SETXATTR", false),
    ("URING_OP_FSETXATTR", "IORING_OP_FSETXATTR", false),
];

/// What the shared-mapping programs read (ebpf/src/mmap.rs).
const MMAP_FIELDS: &[Field] = &[
    f("OFF_MAPPING_HOST", "address_space", "host", 8),
    f(
        "OFF_MAPPING_MMAP_WRITABLE",
        "address_space",
        "i_mmap_writable",
        4,
    ),
    f("OFF_INODE_I_DENTRY", "inode", "i_dentry", 8),
    f("OFF_DENTRY_D_ALIAS", "dentry", "d_u.d_alias", 16),
    f("OFF_FOLIO_FLAGS", "folio", "flags", 8),
    f("OFF_FOLIO_INDEX", "folio", "index", 8),
    f("OFF_FOLIO_FLAGS_1", "folio", "_flags_1", 8),
];

/// The shared-mapping globals, like [`uring_globals`].
pub fn mmap_globals(btf: &Btf) -> (Vec<(&'static str, u64)>, Result<()>) {
    let found = fields(btf, MMAP_FIELDS).and_then(|mut out| {
        let head = btf.enum_value("PG_head")?;
        if !(0..64).contains(&head) {
            bail!("PG_head is {head}, not a page flag bit");
        }
        out.push(("PG_HEAD", head as u64));
        Ok(out)
    });
    match found {
        Ok(out) => (out, Ok(())),
        Err(e) => {
            let unknown = MMAP_FIELDS
                .iter()
                .map(|f| f.global)
                .chain(["PG_HEAD"])
                .map(|g| (g, u64::MAX))
                .collect();
            (unknown, Err(e))
        }
    }
}

/// The io_uring globals: `Ok` with real values if the kernel's BTF has everything the
/// io_uring programs need, else the error and every global set to "unknown" (the
/// programs are then not attached).
pub fn uring_globals(btf: &Btf) -> (Vec<(&'static str, u64)>, Result<()>) {
    let found = fields(btf, URING_FIELDS).and_then(|mut out| {
        for (global, name, required) in URING_OPS {
            match btf.enum_value(name) {
                Ok(v) if (0..=255).contains(&v) => out.push((*global, v as u64)),
                Ok(v) => bail!("{name} is {v}, not an opcode"),
                Err(_) if !required => out.push((*global, u64::MAX)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    });
    match found {
        Ok(out) => (out, Ok(())),
        Err(e) => {
            let unknown = URING_FIELDS
                .iter()
                .map(|f| f.global)
                .chain(URING_OPS.iter().map(|o| o.0))
                .map(|g| (g, u64::MAX))
                .collect();
            (unknown, Err(e))
        }
    }
}

/// (global name, value) pairs for `EbpfLoader::set_global`.
pub fn program_offsets(btf: &Btf) -> Result<Vec<(&'static str, u64)>> {
    fields(btf, FIELDS)
}

fn fields(btf: &Btf, fields: &[Field]) -> Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::with_capacity(fields.len());
    for fld in fields {
        match btf.offset_of(fld.strukt, fld.path) {
            Ok((off, size)) => {
                if fld.size != 0 && size != fld.size {
                    bail!(
                        "kernel field {}.{} is {size} bytes, the capture program reads {}: \
                         this kernel's layout is not supported",
                        fld.strukt,
                        fld.path,
                        fld.size
                    );
                }
                out.push((fld.global, off));
            }
            Err(_) if fld.optional => out.push((fld.global, u64::MAX)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: int(4), ptr, struct inner {int a; int b;},
    /// struct outer { int x; union { int y; struct inner in; }; }.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0y\0in\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(s("int"), KIND_INT, 0, 4, &[32]); // 1
        ty(0, KIND_PTR, 0, 1, &[]); // 2
        ty(
            s("inner"),
            KIND_STRUCT,
            2,
            8,
            &[s("a"), 1, 0, s("b"), 1, 32],
        ); // 3
        ty(0, KIND_UNION, 2, 8, &[s("y"), 1, 0, s("in"), 3, 0]); // 4
        ty(s("outer"), KIND_STRUCT, 2, 16, &[s("x"), 1, 0, 0, 4, 64]); // 5
        let mut d = Vec::new();
        d.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        d.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&t);
        d.extend_from_slice(&strings);
        d
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.offset_of("outer", "x").unwrap(), (0, 4));
        assert_eq!(btf.offset_of("outer", "y").unwrap(), (8, 4));
        assert_eq!(btf.offset_of("outer", "in.b").unwrap(), (12, 4));
        assert!(btf.offset_of("outer", "nope").is_err());
        assert!(btf.offset_of("nope", "x").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut d = sample();
        d.truncate(40);
        assert!(Btf::parse(&d).is_err());
    }

    #[test]
    fn running_kernel_has_every_field() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let btf = Btf::from_sys_fs().unwrap();
        let offs = program_offsets(&btf).unwrap();
        assert_eq!(offs.len(), FIELDS.len());
        // The compat check must be active on x86_64.
        let status = offs
            .iter()
            .find(|(n, _)| *n == "OFF_TASK_TI_STATUS")
            .unwrap();
        assert_ne!(status.1, u64::MAX);
        let (uring, found) = uring_globals(&btf);
        found.unwrap();
        let get = |n: &str| uring.iter().find(|(g, _)| *g == n).unwrap().1;
        // UAPI values: these never change.
        assert_eq!(get("URING_OP_WRITEV"), 2);
        assert_eq!(get("URING_OP_WRITE"), 23);
        assert_eq!(get("OFF_REQ_FILE"), get("OFF_REQ_CMD"));
        let (_, found) = mmap_globals(&btf);
        found.unwrap();
    }
}
