//! Kernel structure offsets from BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The eBPF program is written in Rust, which gets no CO-RE relocations, so every field
//! it reads is located here at load time and handed to it as a global. This is a small,
//! self-contained reader of the BTF format (header, type section, string section): it
//! only needs struct/union members and the modifiers that can sit between them.

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::ptr::{null_mut, NonNull};

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

/// Parsed vmlinux BTF, as an index: where each type's record starts, and the named
/// structs and unions. Members and enumerators are decoded only when a lookup walks
/// them: vmlinux has ~130k types and ~70k members, of which the program needs ~60, and
/// decoding them all was most of this parse's cost at start-up.
pub struct Btf {
    /// The raw BTF: header, type section, string section.
    data: Raw,
    types: Range<usize>,
    strings: Range<usize>,
    /// Where each type's record starts in the type section, by id (id 0 is void).
    at: Vec<u32>,
    /// Named structs and unions by name: the first definition of each.
    by_name: HashMap<Box<[u8]>, u32>,
    /// Ids of the enums (their enumerators share C's one namespace), in BTF order.
    enums: Vec<u32>,
}

/// The raw BTF bytes: mapped where the kernel allows it (6.16 and later), which spares
/// reading 5 MB through sysfs at every start, else read.
enum Raw {
    Mapped { at: NonNull<u8>, len: usize },
    Read(Vec<u8>),
}

// SAFETY: the mapping is private, read-only and owned by `Raw` alone.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

impl Raw {
    fn open(path: &str) -> std::io::Result<Raw> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len() as usize;
        // SAFETY: a new private read-only mapping of a whole file, placed by the kernel;
        // the kernel's own BTF never changes while it runs.
        match unsafe { mmap(null_mut(), len, ProtFlags::READ, MapFlags::PRIVATE, &f, 0) } {
            Ok(p) if len > 0 => Ok(Raw::Mapped {
                at: NonNull::new(p.cast()).expect("mmap returned a null mapping"),
                len,
            }),
            _ => {
                let mut v = Vec::with_capacity(len);
                std::io::Read::read_to_end(&mut &f, &mut v)?;
                Ok(Raw::Read(v))
            }
        }
    }
}

impl Deref for Raw {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            // SAFETY: mapped readable for `len` bytes until drop.
            Raw::Mapped { at, len } => unsafe { std::slice::from_raw_parts(at.as_ptr(), *len) },
            Raw::Read(v) => v,
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Raw::Mapped { at, len } = self {
            // SAFETY: our own mapping, no longer borrowed.
            let _ = unsafe { rustix::mm::munmap(at.as_ptr().cast(), *len) };
        }
    }
}

/// One type's record: its header, and the `vlen` entries that follow it.
struct Record<'a> {
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    entries: &'a [u8],
}

fn u16_at(d: &[u8], at: usize) -> Result<u16> {
    let b = d.get(at..at + 2).context("BTF data truncated")?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32> {
    let b = d.get(at..at + 4).context("BTF data truncated")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// [`u32_at`] in a record the parse already checked to hold it (0 if not).
fn le32(d: &[u8], at: usize) -> u32 {
    u32_at(d, at).unwrap_or(0)
}

/// Bytes of the entries that follow a type's 12-byte header, by kind; `None` for a kind
/// this reader does not know (its length is unknown, so nothing after it can be read).
fn entries_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self> {
        let data = Raw::open(VMLINUX_BTF).with_context(|| {
            format!(
                "cannot read {VMLINUX_BTF}: doppel needs a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y (and sysfs mounted at /sys)"
            )
        })?;
        Self::parse_raw(data).with_context(|| format!("cannot parse {VMLINUX_BTF}"))
    }

    /// Parses raw (little-endian) BTF.
    #[cfg(test)]
    pub fn parse(d: Vec<u8>) -> Result<Self> {
        Self::parse_raw(Raw::Read(d))
    }

    fn parse_raw(d: Raw) -> Result<Self> {
        if u16_at(&d, 0)? != BTF_MAGIC {
            bail!("not little-endian BTF (bad magic)");
        }
        let hdr_len = u32_at(&d, 4)? as usize;
        let section = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|s| Some(s..s.checked_add(len)?))
                .filter(|r| r.end <= d.len())
                .context("BTF section out of range")
        };
        let types = section(u32_at(&d, 8)? as usize, u32_at(&d, 12)? as usize)?;
        let strings = section(u32_at(&d, 16)? as usize, u32_at(&d, 20)? as usize)?;
        let (tsec, strs) = (&d[types.clone()], &d[strings.clone()]);
        if tsec.len() > u32::MAX as usize {
            bail!("BTF type section too large");
        }

        // Type ids start at 1; id 0 is void. vmlinux averages ~40 bytes a type.
        let mut at = Vec::with_capacity(tsec.len() / 32);
        at.push(0u32);
        let mut by_name = HashMap::new();
        let mut enums = Vec::new();
        let mut pos = 0usize;
        while pos < tsec.len() {
            let name = u32_at(tsec, pos)?;
            let info = u32_at(tsec, pos + 4)?;
            let kind = (info >> 24) & 0x1f;
            let len = entries_len(kind, (info & 0xffff) as usize)
                .with_context(|| format!("unknown BTF kind {kind}"))?;
            let end = pos + 12 + len;
            if end > tsec.len() {
                bail!("BTF data truncated");
            }
            let id = at.len() as u32;
            match kind {
                KIND_STRUCT | KIND_UNION => {
                    let n = name_at(strs, name);
                    if !n.is_empty() {
                        by_name.entry(Box::from(n)).or_insert(id);
                    }
                }
                KIND_ENUM | KIND_ENUM64 => enums.push(id),
                _ => {}
            }
            at.push(pos as u32);
            pos = end;
        }
        Ok(Self {
            data: d,
            types,
            strings,
            at,
            by_name,
            enums,
        })
    }

    fn record(&self, id: u32) -> Option<Record<'_>> {
        let tsec = &self.data[self.types.clone()];
        let pos = *self.at.get(id as usize).filter(|_| id != 0)? as usize;
        let info = le32(tsec, pos + 4);
        let kind = (info >> 24) & 0x1f;
        let len = entries_len(kind, (info & 0xffff) as usize)?;
        Some(Record {
            kind,
            kind_flag: info >> 31 != 0,
            size_or_type: le32(tsec, pos + 8),
            entries: tsec.get(pos + 12..pos + 12 + len)?,
        })
    }

    /// Whether the name at string offset `off` is empty.
    fn unnamed(&self, off: u32) -> bool {
        self.data[self.strings.clone()]
            .get(off as usize)
            .is_none_or(|&c| c == 0)
    }

    /// Whether the name at string offset `off` is `want`: compared in place, without
    /// first measuring the name (lookups compare against tens of thousands of them).
    fn name_is(&self, off: u32, want: &str) -> bool {
        let strs = &self.data[self.strings.clone()];
        let (off, want) = (off as usize, want.as_bytes());
        strs.get(off..off + want.len()) == Some(want) && strs.get(off + want.len()) == Some(&0)
    }

    /// Value of the enumerator `name` (e.g. `IORING_OP_WRITE`); the first one of that
    /// name if several enums define it.
    pub fn enum_value(&self, name: &str) -> Result<i64> {
        for &id in &self.enums {
            let Some(r) = self.record(id) else { continue };
            let step = if r.kind == KIND_ENUM64 { 12 } else { 8 };
            for e in r.entries.chunks_exact(step) {
                if !self.name_is(le32(e, 0), name) {
                    continue;
                }
                let lo = le32(e, 4);
                return Ok(if step == 12 {
                    (u64::from(le32(e, 8)) << 32 | u64::from(lo)) as i64
                } else if r.kind_flag {
                    // Signed; a negative value never names an op.
                    i64::from(lo as i32)
                } else {
                    i64::from(lo)
                });
            }
        }
        bail!("enumerator {name} is not in the kernel's BTF")
    }

    /// The type `id` stands for, through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<Record<'_>> {
        for _ in 0..32 {
            let r = self.record(id)?;
            match r.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = r.size_or_type
                }
                _ => return Some(r),
            }
        }
        None
    }

    fn size_of(&self, id: u32) -> Option<u32> {
        let r = self.resolve(id)?;
        match r.kind {
            KIND_PTR => Some(8),
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Some(r.size_or_type)
            }
            // struct btf_array { u32 type; u32 index_type; u32 nelems; }
            KIND_ARRAY if r.entries.len() >= 12 => {
                let elem = self.size_of(le32(r.entries, 0))?;
                elem.checked_mul(le32(r.entries, 8))
            }
            _ => None,
        }
    }

    /// Finds `name` among the members of composite `id`, looking through anonymous
    /// structs/unions. Returns (byte offset, member type id).
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<(u64, u32)> {
        if depth > 8 {
            return None;
        }
        let r = self.resolve(id)?;
        if r.kind != KIND_STRUCT && r.kind != KIND_UNION {
            return None;
        }
        // (name offset, type id, byte offset); with kind_flag the top 8 bits of the
        // offset hold a bitfield's size.
        let members = r.entries.chunks_exact(12).map(|m| {
            let off = le32(m, 8);
            let bits = if r.kind_flag { off & 0xff_ffff } else { off };
            (le32(m, 0), le32(m, 4), u64::from(bits / 8))
        });
        for (m_name, ty, off) in members.clone() {
            if self.name_is(m_name, name) {
                return Some((off, ty));
            }
        }
        for (_, ty, off) in members.filter(|m| self.unnamed(m.0)) {
            if let Some((inner, ty)) = self.find_member(ty, name, depth + 1) {
                return Some((off + inner, ty));
            }
        }
        None
    }

    /// Byte offset and size of `path` (e.g. `"f_path.dentry"`) inside `struct strukt`.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<(u64, u32)> {
        let mut id = *self
            .by_name
            .get(strukt.as_bytes())
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

/// The NUL-terminated string at `off` of the string section, without its NUL; empty
/// when `off` is out of range (a lookup then finds nothing, and says so).
fn name_at(strings: &[u8], off: u32) -> &[u8] {
    let s = strings.get(off as usize..).unwrap_or_default();
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    &s[..end]
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

/// What the filesystem programs read (ebpf/src/fs.rs), besides the shared-mapping
/// fields they also use.
const FS_FIELDS: &[Field] = &[
    f("OFF_KIOCB_FILP", "kiocb", "ki_filp", 8),
    f("OFF_KIOCB_POS", "kiocb", "ki_pos", 8),
    f("OFF_ITER_DATA_SOURCE", "iov_iter", "data_source", 1),
    f("OFF_ITER_COUNT", "iov_iter", "count", 8),
    f("OFF_ITER_TYPE", "iov_iter", "iter_type", 1),
    f("OFF_ITER_UBUF", "iov_iter", "ubuf", 8),
    f("OFF_ITER_IOV_OFFSET", "iov_iter", "iov_offset", 8),
    f("OFF_INODE_I_MAPPING", "inode", "i_mapping", 8),
    f("OFF_MAPPING_XA_HEAD", "address_space", "i_pages.xa_head", 8),
    f("OFF_XA_NODE_SHIFT", "xa_node", "shift", 1),
    f("OFF_XA_NODE_SLOTS", "xa_node", "slots", 0),
    f("OFF_FOLIO_MAPPING", "folio", "mapping", 8),
    f("OFF_FOLIO_PRIVATE", "folio", "private", 8),
    f("OFF_BH_B_DATA", "buffer_head", "b_data", 8),
    // Times (Linux 6.11 and later split them into seconds and nanoseconds).
    f("OFF_INODE_ATIME_SEC", "inode", "i_atime_sec", 8),
    f("OFF_INODE_CTIME_SEC", "inode", "i_ctime_sec", 8),
    f("OFF_INODE_ATIME_NSEC", "inode", "i_atime_nsec", 4),
    f("OFF_INODE_CTIME_NSEC", "inode", "i_ctime_nsec", 4),
];

/// What the xfs programs read (ebpf/src/xfs.rs), besides the filesystem fields.
const XFS_FIELDS: &[Field] = &[
    f("OFF_XFS_I_VNODE", "xfs_inode", "i_vnode", 0),
    f("OFF_DA_ARGS_DP", "xfs_da_args", "dp", 8),
    f("OFF_DA_ARGS_INUMBER", "xfs_da_args", "inumber", 8),
    f("OFF_IOMAP_ITER_INODE", "iomap_iter", "inode", 8),
    f("OFF_IOMAP_ITER_POS", "iomap_iter", "pos", 8),
    // Linux 6.15 and later: where the current mapping's work began.
    f("OFF_IOMAP_ITER_START", "iomap_iter", "iter_start_pos", 8),
    f("OFF_IOMAP_ITER_FLAGS", "iomap_iter", "flags", 4),
    f("OFF_IOMAP_ITER_MAPPED", "iomap_iter", "iomap.length", 8),
    f("OFF_REGS_BX", "pt_regs", "bx", 8),
    f("OFF_REGS_CX", "pt_regs", "cx", 8),
    f("OFF_REGS_BP", "pt_regs", "bp", 8),
];

/// The xfs programs' globals, like [`uring_globals`].
pub fn xfs_globals(btf: &Btf) -> (Vec<(&'static str, u64)>, Result<()>) {
    match fields(btf, XFS_FIELDS) {
        Ok(out) => (out, Ok(())),
        Err(e) => (
            XFS_FIELDS.iter().map(|f| (f.global, u64::MAX)).collect(),
            Err(e),
        ),
    }
}

/// The filesystem programs' globals, like [`uring_globals`].
pub fn fs_globals(btf: &Btf) -> (Vec<(&'static str, u64)>, Result<()>) {
    let found = fields(btf, FS_FIELDS).and_then(|mut out| {
        let ubuf = btf.enum_value("ITER_UBUF")?;
        if !(0..256).contains(&ubuf) {
            bail!("ITER_UBUF is {ubuf}, not an iterator type");
        }
        out.push(("ITER_UBUF", ubuf as u64));
        Ok(out)
    });
    match found {
        Ok(out) => (out, Ok(())),
        Err(e) => (
            FS_FIELDS
                .iter()
                .map(|f| f.global)
                .chain(["ITER_UBUF"])
                .map(|g| (g, u64::MAX))
                .collect(),
            Err(e),
        ),
    }
}

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
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.offset_of("outer", "x").unwrap(), (0, 4));
        assert_eq!(btf.offset_of("outer", "y").unwrap(), (8, 4));
        assert_eq!(btf.offset_of("outer", "in.b").unwrap(), (12, 4));
        assert!(btf.offset_of("outer", "nope").is_err());
        assert!(btf.offset_of("nope", "x").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(Vec::new()).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut d = sample();
        d.truncate(40);
        assert!(Btf::parse(d).is_err());
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
