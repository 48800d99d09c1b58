//! Makes sure the workspace user exists, by editing `/etc/passwd`,
//! `/etc/group`, `/etc/shadow` and `/etc/gshadow` directly.
//!
//! hakim-init is static, so NSS is out, and an image may have no `useradd`
//! (busybox): the files are parsed here. Only the lines we add and the member
//! lists we extend change; every other byte (comments, blank lines, NIS `+`/`-`
//! lines, lines we cannot parse) is written back exactly as it was read.
//!
//! The work is split in two layers:
//! - a pure one ([`plan`], [`insert_record`], [`add_member`]) that takes file
//!   contents and returns new contents, so every rule is tested without a disk;
//! - [`ensure_user`], which reads the files under `root`, runs the plan and
//!   replaces only the files whose content changed, atomically. A second boot
//!   therefore writes nothing.
//!
//! Decisions:
//! - An existing user's uid, gid, home and shell win: they are reported, never
//!   changed. Only supplementary group memberships are added.
//! - A uid already held by another name is an error ([`UserError::UidTaken`]):
//!   a second name on the same uid makes `ls`, `whoami` and `getpwuid` show the
//!   other account, which is worse than a clear message at boot.
//! - A line that carries our name but does not parse is an error too: we never
//!   "fix" lines, and appending a second entry next to it would be a guess.
//! - New accounts get the password `*`: no password can match it, yet unlike
//!   `!` OpenSSH does not treat it as a locked account (with `UsePAM no` it
//!   refuses even keys for `!`). The shadow last-change field stays empty, so
//!   the files do not depend on the date of the boot.
//! - `/etc/shadow` and `/etc/gshadow` are edited only when they exist (busybox
//!   root filesystems may have neither); `/etc/passwd` then carries `*` itself
//!   instead of the `x` that points to shadow. A missing `/etc/passwd` or
//!   `/etc/group` is created (0644, root-owned).
//! - Files are written group → gshadow → shadow → passwd. A crash in between
//!   leaves a group or shadow line without its user; the next boot reuses them
//!   instead of adding duplicates, and the passwd line, written last, marks the
//!   account as complete.
//! - No `lckpwdf`-style locking: this runs as PID 1 before anything else.

use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Shells tried in order when a user is created; the first one that exists
/// (as an executable file inside the root) is used.
pub const DEFAULT_SHELLS: [&str; 2] = ["/bin/bash", "/bin/sh"];

/// The shell written when no candidate exists: every image that can run the
/// agent's terminals has some `/bin/sh`, and `nologin` would break them for
/// sure. A warning says so.
const FALLBACK_SHELL: &str = "/bin/sh";

/// Longest user or group name accepted (the shadow-utils default).
pub const MAX_NAME_LEN: usize = 32;

/// The account we want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    /// Used only when the user is created.
    pub uid: u32,
    /// Used only when the user is created; see [`plan`] for group reuse.
    pub gid: u32,
    /// Absolute path inside the container; used only when the user is created.
    pub home: PathBuf,
    /// Login shell candidates, absolute paths inside the container.
    pub shells: Vec<PathBuf>,
    /// Groups to add the user to, if they exist (e.g. `docker`).
    pub supplementary: Vec<String>,
}

impl UserSpec {
    /// A spec with [`DEFAULT_SHELLS`] and no supplementary groups.
    pub fn new(name: impl Into<String>, uid: u32, gid: u32, home: impl Into<PathBuf>) -> Self {
        UserSpec {
            name: name.into(),
            uid,
            gid,
            home: home.into(),
            shells: DEFAULT_SHELLS.iter().map(PathBuf::from).collect(),
            supplementary: Vec::new(),
        }
    }
}

/// One modification made to the account databases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A group line was added to `/etc/group` (and `/etc/gshadow` if present).
    GroupCreated { name: String, gid: u32 },
    /// The passwd line was added.
    UserCreated { uid: u32, gid: u32 },
    /// The shadow line was added.
    ShadowEntryAdded,
    /// The user was appended to a group's member list (and its gshadow line).
    MemberAdded { group: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::GroupCreated { name, gid } => write!(f, "created group {name} (gid {gid})"),
            Change::UserCreated { uid, gid } => write!(f, "created user (uid {uid}, gid {gid})"),
            Change::ShadowEntryAdded => f.write_str("added shadow entry"),
            Change::MemberAdded { group } => write!(f, "added to group {group}"),
        }
    }
}

/// What is in effect after [`ensure_user`], and what it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserOutcome {
    pub uid: u32,
    pub gid: u32,
    /// Absolute path inside the container, as in `/etc/passwd`.
    pub home: PathBuf,
    /// As in `/etc/passwd`; an empty field is reported as `/bin/sh`, which is
    /// what it means (passwd(5)).
    pub shell: PathBuf,
    /// Name of the group that has the primary gid, if any.
    pub primary_group: Option<String>,
    /// Every group of `/etc/group` that lists the user as a member, in file
    /// order (what `initgroups` will give the agent besides the primary gid).
    pub groups: Vec<String>,
    /// Empty when the account was already as wanted.
    pub changes: Vec<Change>,
    /// Files replaced on disk (container paths such as `/etc/group`). Empty on
    /// a second run.
    pub written: Vec<PathBuf>,
    /// Things an operator may want to fix; none of them stopped the work.
    pub warnings: Vec<String>,
}

/// Why the account could not be ensured.
#[derive(Debug)]
pub enum UserError {
    /// The spec cannot be written into the files (bad name, relative home…).
    InvalidSpec(String),
    /// The user does not exist and its uid belongs to another account.
    UidTaken { uid: u32, user: String },
    /// A line carrying the name we need does not parse; it is left alone.
    Malformed {
        path: &'static str,
        line: usize,
        name: String,
    },
    /// A file to be replaced is a symlink or something else than a regular
    /// file; replacing it would silently turn it into one.
    NotRegularFile { path: PathBuf },
    /// `/etc` cannot be written (read-only file system or permission denied).
    NotWritable { path: PathBuf, source: io::Error },
    /// Any other I/O failure.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::InvalidSpec(why) => write!(f, "invalid user spec: {why}"),
            UserError::UidTaken { uid, user } => write!(
                f,
                "uid {uid} is already used by user {user:?}: choose a free CODER_UID \
                 or set CODER_USER={user}"
            ),
            UserError::Malformed { path, line, name } => write!(
                f,
                "{path} line {line} names {name:?} but is malformed; not editing it"
            ),
            UserError::NotRegularFile { path } => write!(
                f,
                "{} is not a regular file (symlink?); not replacing it",
                path.display()
            ),
            UserError::NotWritable { path, source } => write!(
                f,
                "/etc is not writable (read-only file system or no permission): \
                 cannot write {}: {source}",
                path.display()
            ),
            UserError::Io { op, path, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for UserError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UserError::NotWritable { source, .. } | UserError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Contents of the account databases. `None` for shadow files means the file
/// does not exist (and will not be created); a missing passwd or group file
/// reads as empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Databases {
    pub passwd: Vec<u8>,
    pub group: Vec<u8>,
    pub shadow: Option<Vec<u8>>,
    pub gshadow: Option<Vec<u8>>,
}

/// Shape of one database's records, used to tell records from other lines.
struct Format {
    path: &'static str,
    fields: usize,
    /// Indexes of fields that must be decimal `u32`s.
    numeric: &'static [usize],
}

const PASSWD: Format = Format {
    path: "/etc/passwd",
    fields: 7,
    numeric: &[2, 3],
};
const GROUP: Format = Format {
    path: "/etc/group",
    fields: 4,
    numeric: &[2],
};
const GSHADOW: Format = Format {
    path: "/etc/gshadow",
    fields: 4,
    numeric: &[],
};

/// Lines of a file, each with its `\n` (the last one may lack it).
fn lines(content: &[u8]) -> impl Iterator<Item = &[u8]> {
    content.split_inclusive(|&b| b == b'\n')
}

fn strip_eol(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// NIS compat lines (`+name`, `-name`, `+`): kept, never parsed, and new
/// records go before them, as shadow-utils does, so a `-name` or `+` wildcard
/// cannot hide what we add.
fn is_nis(line: &[u8]) -> bool {
    matches!(line.first(), Some(b'+' | b'-'))
}

/// Lines that can never be records: blank, comments, NIS.
fn is_passive(line: &[u8]) -> bool {
    let body = strip_eol(line);
    body.first() == Some(&b'#') || is_nis(body) || body.iter().all(u8::is_ascii_whitespace)
}

/// Whether this line claims `name` (first field), parsed or not.
fn names(line: &[u8], name: &str) -> bool {
    !is_passive(line) && strip_eol(line).split(|&b| b == b':').next() == Some(name.as_bytes())
}

/// The fields of a well-formed record, or `None`.
fn record<'a>(line: &'a [u8], format: &Format) -> Option<Vec<&'a [u8]>> {
    if is_passive(line) {
        return None;
    }
    let fields: Vec<&[u8]> = strip_eol(line).split(|&b| b == b':').collect();
    let ok = fields.len() == format.fields
        && format
            .numeric
            .iter()
            .all(|&i| fields.get(i).and_then(|f| parse_id(f)).is_some());
    ok.then_some(fields)
}

/// A decimal id, digits only (no sign, no spaces).
fn parse_id(field: &[u8]) -> Option<u32> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// The first line claiming `name`: its 1-based number and fields, `Ok(None)`
/// if no line claims it, or [`UserError::Malformed`] if that line is broken.
fn lookup<'a>(
    content: &'a [u8],
    format: &Format,
    name: &str,
) -> Result<Option<Vec<&'a [u8]>>, UserError> {
    for (index, line) in lines(content).enumerate() {
        if names(line, name) {
            return match record(line, format) {
                Some(fields) => Ok(Some(fields)),
                None => Err(UserError::Malformed {
                    path: format.path,
                    line: index + 1,
                    name: name.to_owned(),
                }),
            };
        }
    }
    Ok(None)
}

/// The first well-formed record whose numeric field `index` equals `id`.
fn find_by_id<'a>(
    content: &'a [u8],
    format: &Format,
    index: usize,
    id: u32,
) -> Option<Vec<&'a [u8]>> {
    lines(content)
        .filter_map(|line| record(line, format))
        .find(|fields| fields.get(index).and_then(|f| parse_id(f)) == Some(id))
}

fn field_id(fields: &[&[u8]], index: usize) -> u32 {
    // Only called on records checked by `record`, whose numeric fields parse.
    fields
        .get(index)
        .and_then(|f| parse_id(f))
        .unwrap_or_default()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `content` with `line` added as a new record: before the first NIS line if
/// there is one, else at the end (after adding the missing final newline, the
/// only byte we ever add to an existing line).
pub fn insert_record(content: &[u8], line: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + line.len() + 2);
    let mut inserted = false;
    for existing in lines(content) {
        if !inserted && is_nis(existing) {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
            inserted = true;
        }
        out.extend_from_slice(existing);
    }
    if !inserted {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Result of [`add_member`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEdit {
    /// New file contents, with the user appended to the group's member list.
    Added(Vec<u8>),
    AlreadyMember,
    /// No line names the group.
    Missing,
    /// The group's line does not parse; it is left alone.
    Malformed,
}

/// Appends `user` to the member list (4th field) of `group` in a group or
/// gshadow file, keeping the existing members and their order.
fn add_member_in(content: &[u8], format: &Format, group: &str, user: &str) -> MemberEdit {
    let mut offset = 0;
    for line in lines(content) {
        if names(line, group) {
            let Some(fields) = record(line, format) else {
                return MemberEdit::Malformed;
            };
            let [name, password, third, members] = fields.as_slice() else {
                return MemberEdit::Malformed;
            };
            if members.split(|&b| b == b',').any(|m| m == user.as_bytes()) {
                return MemberEdit::AlreadyMember;
            }
            let mut out = Vec::with_capacity(content.len() + user.len() + 1);
            out.extend_from_slice(&content[..offset]);
            for field in [name, password, third, members] {
                out.extend_from_slice(field);
                out.push(b':');
            }
            out.pop();
            // "a," already ends with a separator; don't make it "a,,user".
            if !members.is_empty() && !members.ends_with(b",") {
                out.push(b',');
            }
            out.extend_from_slice(user.as_bytes());
            out.extend_from_slice(&line[strip_eol(line).len()..]);
            out.extend_from_slice(&content[offset + line.len()..]);
            return MemberEdit::Added(out);
        }
        offset += line.len();
    }
    MemberEdit::Missing
}

/// [`add_member_in`] for `/etc/group` contents.
pub fn add_member(group_file: &[u8], group: &str, user: &str) -> MemberEdit {
    add_member_in(group_file, &GROUP, group, user)
}

/// Groups of a group file that list `user` as a member, in file order.
fn member_groups(group_file: &[u8], user: &str) -> Vec<String> {
    lines(group_file)
        .filter_map(|line| record(line, &GROUP))
        .filter(|fields| {
            fields
                .get(3)
                .is_some_and(|m| m.split(|&b| b == b',').any(|m| m == user.as_bytes()))
        })
        .filter_map(|fields| fields.first().map(|n| lossy(n)))
        .collect()
}

/// The uid and gid of `name` in a passwd file (its first, well-formed record).
pub fn account_ids(passwd: &[u8], name: &str) -> Option<(u32, u32)> {
    let fields = lookup(passwd, &PASSWD, name).ok()??;
    Some((field_id(&fields, 2), field_id(&fields, 3)))
}

/// `primary` and the gid of every group of a group file that lists `user` as a member,
/// in file order, without repeats. Bytes, not text: a line that is not UTF-8 costs
/// nothing but itself.
pub fn group_ids(group_file: &[u8], user: &str, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    for fields in lines(group_file).filter_map(|line| record(line, &GROUP)) {
        let member = fields
            .get(3)
            .is_some_and(|m| m.split(|&b| b == b',').any(|m| m == user.as_bytes()));
        let gid = field_id(&fields, 2);
        if member && !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    gids
}

/// Portable user/group names: a letter or `_`, then letters, digits, `.`,
/// `_`, `-`. Anything else could break the colon/comma syntax or be taken
/// for a uid.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() <= MAX_NAME_LEN
        && bytes
            .first()
            .is_some_and(|&b| b.is_ascii_alphabetic() || b == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Paths go into a colon-separated, newline-terminated field.
fn check_path(what: &str, path: &Path) -> Result<(), UserError> {
    let bytes = path.as_os_str().as_bytes();
    if !path.is_absolute() {
        return Err(UserError::InvalidSpec(format!(
            "{what} {} is not absolute",
            path.display()
        )));
    }
    if bytes.iter().any(|&b| matches!(b, b':' | b'\n' | b'\0')) {
        return Err(UserError::InvalidSpec(format!(
            "{what} {:?} contains ':', a newline or NUL",
            path
        )));
    }
    Ok(())
}

fn check_spec(spec: &UserSpec) -> Result<(), UserError> {
    if !valid_name(&spec.name) {
        return Err(UserError::InvalidSpec(format!(
            "user name {:?} is not a portable name (letter or _, then letters, digits, . _ -, \
             at most {MAX_NAME_LEN})",
            spec.name
        )));
    }
    // (uid_t)-1 means "no change" to chown and setuid: never a real account.
    for (what, id) in [("uid", spec.uid), ("gid", spec.gid)] {
        if id == u32::MAX {
            return Err(UserError::InvalidSpec(format!("{what} {id} is reserved")));
        }
    }
    check_path("home", &spec.home)?;
    for shell in &spec.shells {
        check_path("shell", shell)?;
    }
    Ok(())
}

/// Decides the new contents of the databases for `spec`. `shell_usable` says
/// whether a shell path (inside the container) can be used as login shell.
/// The returned outcome has an empty `written`: nothing was written yet.
///
/// For a new user the group is chosen in this order: a group that already has
/// `spec.gid` (whatever its name); else a group named like the user (its gid
/// is used); else `name:x:gid:` is added.
pub fn plan(
    db: &Databases,
    spec: &UserSpec,
    shell_usable: &dyn Fn(&Path) -> bool,
) -> Result<(Databases, UserOutcome), UserError> {
    check_spec(spec)?;
    let name = spec.name.as_str();
    let mut new = db.clone();
    let mut changes = Vec::new();
    let mut warnings = Vec::new();

    let (uid, gid, home, shell) = match lookup(&db.passwd, &PASSWD, name)? {
        Some(fields) => {
            let home = PathBuf::from(OsStr::from_bytes(
                fields.get(5).copied().unwrap_or_default(),
            ));
            let shell = match fields.get(6).copied().unwrap_or_default() {
                b"" => PathBuf::from(FALLBACK_SHELL),
                s => PathBuf::from(OsStr::from_bytes(s)),
            };
            if !shell_usable(&shell) {
                warnings.push(format!(
                    "login shell {} of existing user {name} is missing or not executable",
                    shell.display()
                ));
            }
            (field_id(&fields, 2), field_id(&fields, 3), home, shell)
        }
        None => {
            if let Some(other) = find_by_id(&db.passwd, &PASSWD, 2, spec.uid) {
                return Err(UserError::UidTaken {
                    uid: spec.uid,
                    user: lossy(other.first().copied().unwrap_or_default()),
                });
            }
            let gid = if find_by_id(&db.group, &GROUP, 2, spec.gid).is_some() {
                spec.gid
            } else if let Some(fields) = lookup(&db.group, &GROUP, name)? {
                field_id(&fields, 2)
            } else {
                new.group = insert_record(&new.group, &format!("{name}:x:{}:", spec.gid));
                if let Some(gshadow) = &mut new.gshadow {
                    // A leftover line from an interrupted boot is reused.
                    if !lines(gshadow).any(|l| names(l, name)) {
                        *gshadow = insert_record(gshadow, &format!("{name}:!::"));
                    }
                }
                changes.push(Change::GroupCreated {
                    name: name.to_owned(),
                    gid: spec.gid,
                });
                spec.gid
            };

            let shell = match spec.shells.iter().find(|s| shell_usable(s)) {
                Some(shell) => shell.clone(),
                None => {
                    warnings.push(format!(
                        "none of the login shells {:?} exists; using {FALLBACK_SHELL}",
                        spec.shells
                    ));
                    PathBuf::from(FALLBACK_SHELL)
                }
            };

            let password = match &mut new.shadow {
                Some(shadow) => {
                    if !lines(shadow).any(|l| names(l, name)) {
                        *shadow = insert_record(shadow, &format!("{name}:*:::::::"));
                        changes.push(Change::ShadowEntryAdded);
                    }
                    "x"
                }
                None => "*",
            };

            let line = format!(
                "{name}:{password}:{}:{gid}::{}:{}",
                spec.uid,
                spec.home.display(),
                shell.display()
            );
            new.passwd = insert_record(&new.passwd, &line);
            changes.push(Change::UserCreated { uid: spec.uid, gid });
            (spec.uid, gid, spec.home.clone(), shell)
        }
    };

    let primary_group =
        find_by_id(&new.group, &GROUP, 2, gid).and_then(|fields| fields.first().map(|n| lossy(n)));

    let mut seen: Vec<&str> = Vec::new();
    for group in &spec.supplementary {
        let group = group.as_str();
        if seen.contains(&group) {
            continue;
        }
        seen.push(group);
        if !valid_name(group) {
            warnings.push(format!(
                "supplementary group {group:?} is not a valid name; skipped"
            ));
            continue;
        }
        // The primary gid already gives that membership.
        if primary_group.as_deref() == Some(group) {
            continue;
        }
        match add_member(&new.group, group, name) {
            MemberEdit::Added(content) => {
                new.group = content;
                if let Some(gshadow) = &mut new.gshadow {
                    if let MemberEdit::Added(content) =
                        add_member_in(gshadow, &GSHADOW, group, name)
                    {
                        *gshadow = content;
                    }
                }
                changes.push(Change::MemberAdded {
                    group: group.to_owned(),
                });
            }
            MemberEdit::AlreadyMember => {}
            MemberEdit::Missing => {
                warnings.push(format!(
                    "group {group} does not exist; {name} not added to it"
                ));
            }
            MemberEdit::Malformed => warnings.push(format!(
                "the /etc/group line of {group} is malformed; {name} not added to it"
            )),
        }
    }

    let outcome = UserOutcome {
        uid,
        gid,
        home,
        shell,
        primary_group,
        groups: member_groups(&new.group, name),
        changes,
        written: Vec::new(),
        warnings,
    };
    Ok((new, outcome))
}

/// `path` (absolute inside the container) as a path under `root`. `..` is
/// dropped so a path read from passwd cannot point outside the root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for component in path.components() {
        if let Component::Normal(part) = component {
            out.push(part);
        }
    }
    out
}

/// An executable regular file. Symlinks are followed by the host; with a
/// root other than `/` (tests), an absolute link resolves against the host's
/// `/`, which only matters to fixtures that build such links.
fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, UserError> {
    match fs::read(path) {
        Ok(content) => Ok(Some(content)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(UserError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Read-only file systems and permission problems get their own error so the
/// caller can say "read-only /etc" instead of an errno.
fn write_error(op: &'static str, path: &Path, source: io::Error) -> UserError {
    match source.raw_os_error() {
        Some(libc::EROFS | libc::EACCES | libc::EPERM) => UserError::NotWritable {
            path: path.to_path_buf(),
            source,
        },
        _ => UserError::Io {
            op,
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Replaces `dir/name` with `content` atomically: a temporary file in the same
/// directory gets the content, the original's owner and mode (or `new_mode`,
/// root-owned, for a new file), is fsynced and renamed over the original.
fn write_atomic(
    dir: &Path,
    name: &str,
    content: &[u8],
    new_mode: u32,
    warnings: &mut Vec<String>,
) -> Result<(), UserError> {
    let path = dir.join(name);
    let (mode, owner) = match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_file() => {
            (meta.mode() & 0o7777, Some((meta.uid(), meta.gid())))
        }
        Ok(_) => return Err(UserError::NotRegularFile { path }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (new_mode, None),
        Err(source) => {
            return Err(UserError::Io {
                op: "inspecting",
                path,
                source,
            })
        }
    };

    // A fixed name: PID 1 is the only writer at boot, so a leftover is ours,
    // from a boot that crashed mid-write, and is simply replaced.
    let tmp = dir.join(format!(".{name}.hakim-new"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_error("removing stale", &tmp, e)),
    }

    let result = (|| -> Result<(), (&'static str, io::Error)> {
        // 0600 until the final mode is set: shadow content is never readable
        // by others, even for a moment.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ("creating", e))?;
        file.write_all(content).map_err(|e| ("writing", e))?;
        if let Some((uid, gid)) = owner {
            let current = file.metadata().map_err(|e| ("inspecting", e))?;
            if (current.uid(), current.gid()) != (uid, gid) {
                // Without CAP_CHOWN (some Docker setups) root cannot give
                // shadow back to group `shadow`; root-only access is still safe.
                if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                    warnings.push(format!(
                        "could not restore owner {uid}:{gid} of {}: {e}",
                        path.display()
                    ));
                }
            }
        }
        // After chown, which may clear set-id bits.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| ("setting mode of", e))?;
        file.sync_all().map_err(|e| ("syncing", e))?;
        Ok(())
    })();
    if let Err((op, e)) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_error(op, &tmp, e));
    }
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(write_error("renaming over", &path, e));
    }
    // Makes the rename itself durable. The new content is already in place,
    // so a failure here (some file systems refuse to fsync directories) is
    // not worth failing the boot for.
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Makes sure `spec`'s user exists in the databases under `root/etc`, adding
/// it and its memberships as described in [`plan`] and the module doc.
/// Idempotent: when nothing needs changing, no file is written.
pub fn ensure_user(root: &Path, spec: &UserSpec) -> Result<UserOutcome, UserError> {
    let etc = root.join("etc");
    let passwd = read_optional(&etc.join("passwd"))?;
    let group = read_optional(&etc.join("group"))?;
    let db = Databases {
        passwd: passwd.unwrap_or_default(),
        group: group.unwrap_or_default(),
        shadow: read_optional(&etc.join("shadow"))?,
        gshadow: read_optional(&etc.join("gshadow"))?,
    };
    let shell_usable = |shell: &Path| is_executable(&inside(root, shell));
    let (new, mut outcome) = plan(&db, spec, &shell_usable)?;

    // Order matters: see the module doc.
    let files: [(&str, &[u8], &[u8], u32); 4] = [
        ("group", &db.group, &new.group, 0o644),
        (
            "gshadow",
            db.gshadow.as_deref().unwrap_or_default(),
            new.gshadow.as_deref().unwrap_or_default(),
            0o640,
        ),
        (
            "shadow",
            db.shadow.as_deref().unwrap_or_default(),
            new.shadow.as_deref().unwrap_or_default(),
            0o640,
        ),
        ("passwd", &db.passwd, &new.passwd, 0o644),
    ];
    for (name, old, new, mode) in files {
        if old != new {
            write_atomic(&etc, name, new, mode, &mut outcome.warnings)?;
            outcome.written.push(Path::new("/etc").join(name));
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_groups_survive_a_line_that_is_not_utf8() {
        let passwd = b"root:x:0:0:root:/root:/bin/sh\nj\xf6rg:x:1001:1001::/home/j:/bin/sh\n\
                       coder:x:1000:1000::/home/coder:/bin/bash\n";
        assert_eq!(account_ids(passwd, "coder"), Some((1000, 1000)));
        assert_eq!(account_ids(passwd, "nobody"), None);
        let group = b"root:x:0:\ndocker:x:999:coder\nb\xe4r:x:5:coder\nwheel:x:10:j,coder\n\
                      docker2:x:999:coder\nbroken:x:\n";
        assert_eq!(group_ids(group, "coder", 1000), [1000, 999, 5, 10]);
        assert_eq!(group_ids(group, "cod", 1000), [1000]);
    }

    const PASSWD_DEBIAN: &str = "root:x:0:0:root:/root:/bin/bash\n\
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP_DEBIAN: &str = "root:x:0:\n\
sudo:x:27:\n\
docker:x:998:\n\
users:x:100:\n\
nogroup:x:65534:\n";
    const SHADOW_DEBIAN: &str = "root:*:19000:0:99999:7:::\n\
daemon:*:19000:0:99999:7:::\n\
nobody:*:19000:0:99999:7:::\n";
    const GSHADOW_DEBIAN: &str = "root:*::\n\
sudo:*::\n\
docker:!::\n\
users:*::\n\
nogroup:*::\n";

    fn debian() -> Databases {
        Databases {
            passwd: PASSWD_DEBIAN.into(),
            group: GROUP_DEBIAN.into(),
            shadow: Some(SHADOW_DEBIAN.into()),
            gshadow: Some(GSHADOW_DEBIAN.into()),
        }
    }

    fn coder() -> UserSpec {
        let mut spec = UserSpec::new("coder", 1000, 1000, "/home/coder");
        spec.supplementary = vec!["docker".into()];
        spec
    }

    fn bash_exists(p: &Path) -> bool {
        p == Path::new("/bin/bash") || p == Path::new("/bin/sh")
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    // ---- line layer ----

    #[test]
    fn insert_appends_with_newline() {
        assert_eq!(insert_record(b"a:x\n", "b:y"), b"a:x\nb:y\n");
    }

    #[test]
    fn insert_adds_missing_final_newline_only() {
        assert_eq!(insert_record(b"a:x", "b:y"), b"a:x\nb:y\n");
    }

    #[test]
    fn insert_into_empty_file() {
        assert_eq!(insert_record(b"", "b:y"), b"b:y\n");
    }

    #[test]
    fn insert_goes_before_nis_lines() {
        assert_eq!(
            insert_record(b"a:x\n+@admins\n-bad\n+\n", "b:y"),
            b"a:x\nb:y\n+@admins\n-bad\n+\n"
        );
    }

    #[test]
    fn insert_before_nis_line_without_newline() {
        assert_eq!(insert_record(b"a:x\n+", "b:y"), b"a:x\nb:y\n+");
    }

    #[test]
    fn record_rejects_comments_blank_nis_and_bad_counts() {
        assert!(record(b"# c:o:m:m:e:n:t\n", &PASSWD).is_none());
        assert!(record(b"   \n", &PASSWD).is_none());
        assert!(record(b"+coder:x:1:1:::\n", &PASSWD).is_none());
        assert!(record(b"a:x:1:1::\n", &PASSWD).is_none());
        assert!(record(b"a:x:1:1::::\n", &PASSWD).is_none());
        assert!(record(b"a:x:1:1:::\n", &PASSWD).is_some());
        assert!(record(b"a:x:1:one:::sh\n", &PASSWD).is_none());
        assert!(record(b"a:x: 1:1:::sh\n", &PASSWD).is_none());
        assert!(record(b"a:x:4294967296:1:::sh\n", &PASSWD).is_none());
        assert!(record(b"a:x:1:1:::sh\n", &PASSWD).is_some());
        assert!(record(b"a:x:1:1:::sh", &PASSWD).is_some());
    }

    #[test]
    fn parse_id_is_strict() {
        assert_eq!(parse_id(b"0"), Some(0));
        assert_eq!(parse_id(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_id(b""), None);
        assert_eq!(parse_id(b"+1"), None);
        assert_eq!(parse_id(b"-1"), None);
        assert_eq!(parse_id(b"1 "), None);
        assert_eq!(parse_id(b"\xff"), None);
    }

    #[test]
    fn add_member_to_empty_list() {
        assert_eq!(
            add_member(b"docker:x:998:\n", "docker", "coder"),
            MemberEdit::Added(b"docker:x:998:coder\n".to_vec())
        );
    }

    #[test]
    fn add_member_keeps_order_and_other_lines() {
        let before = b"# c\nroot:x:0:\ndocker:x:998:alice,bob\nusers:x:100:\n";
        assert_eq!(
            add_member(before, "docker", "coder"),
            MemberEdit::Added(
                b"# c\nroot:x:0:\ndocker:x:998:alice,bob,coder\nusers:x:100:\n".to_vec()
            )
        );
    }

    #[test]
    fn add_member_on_last_line_without_newline() {
        assert_eq!(
            add_member(b"root:x:0:\ndocker:x:998:a", "docker", "coder"),
            MemberEdit::Added(b"root:x:0:\ndocker:x:998:a,coder".to_vec())
        );
    }

    #[test]
    fn add_member_after_trailing_comma() {
        assert_eq!(
            add_member(b"docker:x:998:a,\n", "docker", "coder"),
            MemberEdit::Added(b"docker:x:998:a,coder\n".to_vec())
        );
    }

    #[test]
    fn add_member_already_there() {
        assert_eq!(
            add_member(b"docker:x:998:a,coder,b\n", "docker", "coder"),
            MemberEdit::AlreadyMember
        );
    }

    #[test]
    fn add_member_ignores_prefix_names() {
        assert_eq!(
            add_member(b"docker:x:998:coder2,coder.x\n", "docker", "coder"),
            MemberEdit::Added(b"docker:x:998:coder2,coder.x,coder\n".to_vec())
        );
    }

    #[test]
    fn add_member_missing_and_malformed() {
        assert_eq!(
            add_member(b"root:x:0:\n", "docker", "coder"),
            MemberEdit::Missing
        );
        assert_eq!(
            add_member(b"# docker:x:998:\n", "docker", "coder"),
            MemberEdit::Missing
        );
        assert_eq!(
            add_member(b"docker:x:998\n", "docker", "coder"),
            MemberEdit::Malformed
        );
        assert_eq!(
            add_member(b"docker:x:abc:\n", "docker", "coder"),
            MemberEdit::Malformed
        );
    }

    #[test]
    fn gshadow_members_field_is_edited() {
        assert_eq!(
            add_member_in(b"docker:!:admin:a\n", &GSHADOW, "docker", "coder"),
            MemberEdit::Added(b"docker:!:admin:a,coder\n".to_vec())
        );
    }

    #[test]
    fn member_groups_in_file_order() {
        let group = b"a:x:1:coder\nb:x:2:x\nbad:x:3\nc:x:3:y,coder\n# d:x:4:coder\n";
        assert_eq!(member_groups(group, "coder"), vec!["a", "c"]);
    }

    // ---- plan ----

    #[test]
    fn creates_user_in_debian_databases() {
        let (new, out) = plan(&debian(), &coder(), &bash_exists).unwrap();
        assert_eq!(
            text(&new.passwd),
            format!("{PASSWD_DEBIAN}coder:x:1000:1000::/home/coder:/bin/bash\n")
        );
        assert_eq!(
            text(&new.group),
            "root:x:0:\nsudo:x:27:\ndocker:x:998:coder\nusers:x:100:\nnogroup:x:65534:\ncoder:x:1000:\n"
        );
        assert_eq!(
            text(new.shadow.as_deref().unwrap()),
            format!("{SHADOW_DEBIAN}coder:*:::::::\n")
        );
        assert_eq!(
            text(new.gshadow.as_deref().unwrap()),
            "root:*::\nsudo:*::\ndocker:!::coder\nusers:*::\nnogroup:*::\ncoder:!::\n"
        );
        assert_eq!((out.uid, out.gid), (1000, 1000));
        assert_eq!(out.home, Path::new("/home/coder"));
        assert_eq!(out.shell, Path::new("/bin/bash"));
        assert_eq!(out.primary_group.as_deref(), Some("coder"));
        assert_eq!(out.groups, vec!["docker"]);
        assert_eq!(
            out.changes,
            vec![
                Change::GroupCreated {
                    name: "coder".into(),
                    gid: 1000
                },
                Change::ShadowEntryAdded,
                Change::UserCreated {
                    uid: 1000,
                    gid: 1000
                },
                Change::MemberAdded {
                    group: "docker".into()
                },
            ]
        );
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert!(out.written.is_empty());
    }

    #[test]
    fn shadow_line_has_the_right_field_count() {
        let (new, _) = plan(&debian(), &coder(), &bash_exists).unwrap();
        let shadow = new.shadow.unwrap();
        let line = lines(&shadow).last().unwrap();
        assert_eq!(strip_eol(line).split(|&b| b == b':').count(), 9);
    }

    #[test]
    fn second_plan_changes_nothing() {
        let (once, _) = plan(&debian(), &coder(), &bash_exists).unwrap();
        let (twice, out) = plan(&once, &coder(), &bash_exists).unwrap();
        assert_eq!(twice, once);
        assert!(out.changes.is_empty(), "{:?}", out.changes);
        assert_eq!(out.groups, vec!["docker"]);
        assert_eq!(out.primary_group.as_deref(), Some("coder"));
    }

    #[test]
    fn preserves_comments_blank_malformed_and_nis_lines() {
        let passwd: &[u8] =
            b"# managed by hand\n\nroot:x:0:0:root:/root:/bin/bash\nbroken line\nx:y\n\
                              weird:x:1:1:::\xff-not-utf8\n  \t\n+@netgroup\n+::::::\n";
        let group = "# groups\nroot:x:0:\n\ndocker:x:998:\nbad::\n+\n";
        let db = Databases {
            passwd: passwd.to_vec(),
            group: group.into(),
            shadow: None,
            gshadow: None,
        };
        let (new, _) = plan(&db, &coder(), &bash_exists).unwrap();
        let expected: &[u8] = b"# managed by hand\n\nroot:x:0:0:root:/root:/bin/bash\nbroken line\nx:y\n\
                                weird:x:1:1:::\xff-not-utf8\n  \t\ncoder:*:1000:1000::/home/coder:/bin/bash\n\
                                +@netgroup\n+::::::\n";
        assert_eq!(new.passwd, expected);
        assert_eq!(
            text(&new.group),
            "# groups\nroot:x:0:\n\ndocker:x:998:coder\nbad::\ncoder:x:1000:\n+\n"
        );
    }

    #[test]
    fn non_utf8_bytes_are_preserved() {
        let mut passwd = b"r\xe9my:x:5:5:R\xe9my:/home/r\xe9my:/bin/sh\n".to_vec();
        let db = Databases {
            passwd: passwd.clone(),
            ..Databases::default()
        };
        let (new, _) = plan(&db, &coder(), &bash_exists).unwrap();
        passwd.extend_from_slice(b"coder:*:1000:1000::/home/coder:/bin/bash\n");
        assert_eq!(new.passwd, passwd);
    }

    #[test]
    fn without_shadow_files_passwd_holds_the_star() {
        let db = Databases {
            passwd: PASSWD_DEBIAN.into(),
            group: GROUP_DEBIAN.into(),
            shadow: None,
            gshadow: None,
        };
        let (new, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert!(text(&new.passwd).ends_with("coder:*:1000:1000::/home/coder:/bin/bash\n"));
        assert_eq!(new.shadow, None);
        assert_eq!(new.gshadow, None);
        assert!(!out.changes.contains(&Change::ShadowEntryAdded));
    }

    #[test]
    fn empty_databases_get_group_and_user() {
        let (new, out) = plan(&Databases::default(), &coder(), &bash_exists).unwrap();
        assert_eq!(
            text(&new.passwd),
            "coder:*:1000:1000::/home/coder:/bin/bash\n"
        );
        assert_eq!(text(&new.group), "coder:x:1000:\n");
        assert!(out
            .warnings
            .iter()
            .any(|w| w.contains("docker does not exist")));
    }

    #[test]
    fn existing_user_keeps_real_ids_home_and_shell() {
        let mut db = debian();
        db.passwd
            .extend_from_slice(b"coder:x:1001:1002:Coder:/srv/coder:/bin/zsh\n");
        db.group.extend_from_slice(b"staff:x:1002:\n");
        let before = db.clone();
        let spec = UserSpec {
            supplementary: vec![],
            ..coder()
        };
        let (new, out) = plan(&db, &spec, &|_| true).unwrap();
        assert_eq!(new, before);
        assert_eq!((out.uid, out.gid), (1001, 1002));
        assert_eq!(out.home, Path::new("/srv/coder"));
        assert_eq!(out.shell, Path::new("/bin/zsh"));
        assert_eq!(out.primary_group.as_deref(), Some("staff"));
        assert!(out.changes.is_empty());
    }

    #[test]
    fn existing_user_still_gets_supplementary_groups() {
        let mut db = debian();
        db.passwd
            .extend_from_slice(b"coder:x:1001:1001::/home/coder:/bin/bash\n");
        let (new, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert_eq!(new.passwd, db.passwd);
        assert!(text(&new.group).contains("docker:x:998:coder\n"));
        assert_eq!(
            out.changes,
            vec![Change::MemberAdded {
                group: "docker".into()
            }]
        );
        assert_eq!(out.primary_group, None);
    }

    #[test]
    fn existing_user_with_empty_shell_reports_bin_sh() {
        let db = Databases {
            passwd: b"coder:x:1000:1000:::\n".to_vec(),
            ..Databases::default()
        };
        let (_, out) = plan(&db, &UserSpec::new("coder", 1, 1, "/h"), &bash_exists).unwrap();
        assert_eq!(out.shell, Path::new("/bin/sh"));
        assert_eq!(out.home, Path::new(""));
        assert!(out.warnings.is_empty());
    }

    #[test]
    fn existing_user_with_missing_shell_is_warned() {
        let db = Databases {
            passwd: b"coder:x:1000:1000::/home/coder:/usr/bin/fish\n".to_vec(),
            ..Databases::default()
        };
        let (_, out) = plan(&db, &UserSpec::new("coder", 1, 1, "/h"), &bash_exists).unwrap();
        assert_eq!(out.shell, Path::new("/usr/bin/fish"));
        assert!(out.warnings.iter().any(|w| w.contains("/usr/bin/fish")));
    }

    #[test]
    fn first_entry_of_duplicates_wins() {
        let db = Databases {
            passwd: b"coder:x:1001:1001::/a:/bin/sh\ncoder:x:1002:1002::/b:/bin/sh\n".to_vec(),
            ..Databases::default()
        };
        let (_, out) = plan(&db, &UserSpec::new("coder", 1, 1, "/h"), &bash_exists).unwrap();
        assert_eq!(out.uid, 1001);
        assert_eq!(out.home, Path::new("/a"));
    }

    #[test]
    fn reuses_group_that_has_the_gid_whatever_its_name() {
        let mut db = debian();
        db.group.extend_from_slice(b"devs:x:1000:alice\n");
        let (new, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert!(!text(&new.group).contains("coder:x:"));
        assert_eq!(
            new.gshadow,
            Some(b"root:*::\nsudo:*::\ndocker:!::coder\nusers:*::\nnogroup:*::\n".to_vec())
        );
        assert!(text(&new.passwd).ends_with("coder:x:1000:1000::/home/coder:/bin/bash\n"));
        assert_eq!(out.gid, 1000);
        assert_eq!(out.primary_group.as_deref(), Some("devs"));
        assert!(!out
            .changes
            .iter()
            .any(|c| matches!(c, Change::GroupCreated { .. })));
    }

    #[test]
    fn reuses_group_named_like_the_user_with_its_gid() {
        let mut db = debian();
        db.group.extend_from_slice(b"coder:x:1005:\n");
        let (new, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert_eq!(text(&new.group).matches("coder:x:").count(), 1);
        assert!(text(&new.passwd).ends_with("coder:x:1000:1005::/home/coder:/bin/bash\n"));
        assert_eq!((out.uid, out.gid), (1000, 1005));
        assert_eq!(out.primary_group.as_deref(), Some("coder"));
    }

    #[test]
    fn gid_match_wins_over_name_match() {
        let mut db = debian();
        db.group.extend_from_slice(b"coder:x:1005:\ndevs:x:1000:\n");
        let (_, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert_eq!(out.gid, 1000);
        assert_eq!(out.primary_group.as_deref(), Some("devs"));
    }

    #[test]
    fn leftover_shadow_and_gshadow_lines_are_reused() {
        let mut db = debian();
        db.shadow
            .as_mut()
            .unwrap()
            .extend_from_slice(b"coder:*:::::::\n");
        db.gshadow
            .as_mut()
            .unwrap()
            .extend_from_slice(b"coder:!::\n");
        let (new, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert_eq!(new.shadow, db.shadow);
        assert_eq!(
            text(new.gshadow.as_deref().unwrap())
                .matches("coder:!::\n")
                .count(),
            1
        );
        assert!(!out.changes.contains(&Change::ShadowEntryAdded));
    }

    #[test]
    fn uid_taken_by_another_user_is_an_error() {
        let mut db = debian();
        db.passwd
            .extend_from_slice(b"ubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n");
        let err = plan(&db, &coder(), &bash_exists).unwrap_err();
        assert!(
            matches!(&err, UserError::UidTaken { uid: 1000, user } if user == "ubuntu"),
            "{err:?}"
        );
        assert!(err.to_string().contains("ubuntu"));
    }

    #[test]
    fn malformed_line_with_our_name_is_an_error() {
        let mut db = debian();
        db.passwd.extend_from_slice(b"coder:x:1000\n");
        let err = plan(&db, &coder(), &bash_exists).unwrap_err();
        assert!(
            matches!(
                err,
                UserError::Malformed {
                    path: "/etc/passwd",
                    line: 4,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_group_with_our_name_is_an_error() {
        let mut db = debian();
        db.group.extend_from_slice(b"coder:x:\n");
        let err = plan(&db, &coder(), &bash_exists).unwrap_err();
        assert!(
            matches!(
                err,
                UserError::Malformed {
                    path: "/etc/group",
                    line: 6,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn commented_or_nis_user_is_not_an_existing_user() {
        let db = Databases {
            passwd: b"#coder:x:5:5::/x:/bin/sh\n+coder::::::\n".to_vec(),
            ..Databases::default()
        };
        let (new, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert_eq!(out.uid, 1000);
        assert_eq!(
            text(&new.passwd),
            "#coder:x:5:5::/x:/bin/sh\ncoder:*:1000:1000::/home/coder:/bin/bash\n+coder::::::\n"
        );
    }

    #[test]
    fn missing_supplementary_groups_are_warned_and_skipped() {
        let mut spec = coder();
        spec.supplementary = vec!["wheel".into(), "docker".into(), "kvm".into()];
        let (new, out) = plan(&debian(), &spec, &bash_exists).unwrap();
        assert!(text(&new.group).contains("docker:x:998:coder\n"));
        assert!(!text(&new.group).contains("wheel"));
        assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("wheel"));
        assert!(out.warnings[1].contains("kvm"));
    }

    #[test]
    fn malformed_supplementary_group_is_warned() {
        let mut db = debian();
        db.group.extend_from_slice(b"video:x\n");
        let mut spec = coder();
        spec.supplementary = vec!["video".into()];
        let (new, out) = plan(&db, &spec, &bash_exists).unwrap();
        assert!(text(&new.group).contains("video:x\n"));
        assert!(out
            .warnings
            .iter()
            .any(|w| w.contains("video") && w.contains("malformed")));
    }

    #[test]
    fn invalid_supplementary_name_is_warned() {
        let mut spec = coder();
        spec.supplementary = vec!["bad:name".into(), "".into()];
        let (new, out) = plan(&debian(), &spec, &bash_exists).unwrap();
        assert!(!text(&new.group).contains("bad"));
        assert_eq!(out.warnings.len(), 2);
    }

    #[test]
    fn docker_membership_is_added_once() {
        let mut spec = coder();
        spec.supplementary = vec!["docker".into(), "docker".into()];
        let (once, out) = plan(&debian(), &spec, &bash_exists).unwrap();
        assert_eq!(text(&once.group).matches("coder").count(), 2); // docker member + own group
        assert!(text(&once.group).contains("docker:x:998:coder\n"));
        assert_eq!(
            out.changes
                .iter()
                .filter(|c| matches!(c, Change::MemberAdded { .. }))
                .count(),
            1
        );
        let (twice, _) = plan(&once, &spec, &bash_exists).unwrap();
        assert_eq!(twice.group, once.group);
    }

    #[test]
    fn keeps_existing_memberships_in_reported_groups() {
        let mut db = debian();
        db.group = b"sudo:x:27:coder\ndocker:x:998:\n".to_vec();
        let (_, out) = plan(&db, &coder(), &bash_exists).unwrap();
        assert_eq!(out.groups, vec!["sudo", "docker"]);
    }

    #[test]
    fn primary_group_is_not_added_as_member() {
        let mut spec = coder();
        spec.supplementary = vec!["coder".into()];
        let (new, out) = plan(&debian(), &spec, &bash_exists).unwrap();
        assert!(text(&new.group).contains("coder:x:1000:\n"));
        assert!(out.groups.is_empty());
        assert!(out.warnings.is_empty());
    }

    #[test]
    fn shell_falls_back_to_sh_then_warns() {
        let only_sh = |p: &Path| p == Path::new("/bin/sh");
        let (_, out) = plan(&debian(), &coder(), &only_sh).unwrap();
        assert_eq!(out.shell, Path::new("/bin/sh"));
        assert!(out.warnings.is_empty());

        let mut spec = coder();
        spec.shells = vec!["/bin/zsh".into()];
        let (new, out) = plan(&debian(), &spec, &|_| false).unwrap();
        assert_eq!(out.shell, Path::new("/bin/sh"));
        assert!(text(&new.passwd).ends_with(":/home/coder:/bin/sh\n"));
        assert!(out.warnings.iter().any(|w| w.contains("zsh")));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let cases = [
            UserSpec::new("", 1000, 1000, "/home/x"),
            UserSpec::new("co:der", 1000, 1000, "/home/x"),
            UserSpec::new("co der", 1000, 1000, "/home/x"),
            UserSpec::new("-coder", 1000, 1000, "/home/x"),
            UserSpec::new("+coder", 1000, 1000, "/home/x"),
            UserSpec::new("1000", 1000, 1000, "/home/x"),
            UserSpec::new("a".repeat(33), 1000, 1000, "/home/x"),
            UserSpec::new("coder\n", 1000, 1000, "/home/x"),
            UserSpec::new("coder", u32::MAX, 1000, "/home/x"),
            UserSpec::new("coder", 1000, u32::MAX, "/home/x"),
            UserSpec::new("coder", 1000, 1000, "home/x"),
            UserSpec::new("coder", 1000, 1000, ""),
            UserSpec::new("coder", 1000, 1000, "/home/a:b"),
            UserSpec::new("coder", 1000, 1000, "/home/a\nroot:x:0:0::/:/bin/sh"),
            UserSpec {
                shells: vec!["bash".into()],
                ..coder()
            },
        ];
        for spec in cases {
            let result = plan(&debian(), &spec, &bash_exists);
            assert!(
                matches!(result, Err(UserError::InvalidSpec(_))),
                "{spec:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn valid_names() {
        for name in ["coder", "_svc", "john.doe", "a-b_c", "A1", &"a".repeat(32)] {
            assert!(valid_name(name), "{name}");
        }
    }

    // ---- files ----

    struct Root {
        dir: tempfile::TempDir,
    }

    impl Root {
        fn debian() -> Root {
            let dir = tempfile::tempdir().unwrap();
            let etc = dir.path().join("etc");
            fs::create_dir(&etc).unwrap();
            for (name, content, mode, gid) in [
                ("passwd", PASSWD_DEBIAN, 0o644, 0),
                ("group", GROUP_DEBIAN, 0o644, 0),
                ("shadow", SHADOW_DEBIAN, 0o640, 42),
                ("gshadow", GSHADOW_DEBIAN, 0o640, 42),
            ] {
                let path = etc.join(name);
                fs::write(&path, content).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                std::os::unix::fs::chown(&path, Some(0), Some(gid)).unwrap();
            }
            let bin = dir.path().join("bin");
            fs::create_dir(&bin).unwrap();
            for shell in ["bash", "sh"] {
                fs::write(bin.join(shell), "").unwrap();
                fs::set_permissions(bin.join(shell), fs::Permissions::from_mode(0o755)).unwrap();
            }
            Root { dir }
        }
        fn path(&self) -> &Path {
            self.dir.path()
        }
        fn etc(&self, name: &str) -> PathBuf {
            self.path().join("etc").join(name)
        }
        fn read(&self, name: &str) -> String {
            fs::read_to_string(self.etc(name)).unwrap()
        }
        fn etc_listing(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(self.path().join("etc"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    #[test]
    fn ensure_user_creates_everything_on_disk() {
        let root = Root::debian();
        let out = ensure_user(root.path(), &coder()).unwrap();
        assert_eq!(
            root.read("passwd"),
            format!("{PASSWD_DEBIAN}coder:x:1000:1000::/home/coder:/bin/bash\n")
        );
        assert!(root
            .read("group")
            .ends_with("docker:x:998:coder\nusers:x:100:\nnogroup:x:65534:\ncoder:x:1000:\n"));
        assert_eq!(
            root.read("shadow"),
            format!("{SHADOW_DEBIAN}coder:*:::::::\n")
        );
        assert!(root.read("gshadow").ends_with("coder:!::\n"));
        assert_eq!(
            out.written,
            ["/etc/group", "/etc/gshadow", "/etc/shadow", "/etc/passwd"]
                .map(PathBuf::from)
                .to_vec()
        );
        assert_eq!(out.shell, Path::new("/bin/bash"));
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        // No temporary file left behind.
        assert_eq!(
            root.etc_listing(),
            vec!["group", "gshadow", "passwd", "shadow"]
        );
    }

    #[test]
    fn ensure_user_preserves_mode_and_owner() {
        let root = Root::debian();
        ensure_user(root.path(), &coder()).unwrap();
        for (name, mode, gid) in [
            ("passwd", 0o644, 0),
            ("group", 0o644, 0),
            ("shadow", 0o640, 42),
            ("gshadow", 0o640, 42),
        ] {
            let meta = fs::metadata(root.etc(name)).unwrap();
            assert_eq!(meta.mode() & 0o7777, mode, "{name}");
            assert_eq!((meta.uid(), meta.gid()), (0, gid), "{name}");
        }
    }

    #[test]
    fn ensure_user_preserves_mode_0000_shadow() {
        let root = Root::debian();
        fs::set_permissions(root.etc("shadow"), fs::Permissions::from_mode(0o000)).unwrap();
        ensure_user(root.path(), &coder()).unwrap();
        assert_eq!(fs::metadata(root.etc("shadow")).unwrap().mode() & 0o7777, 0);
        assert!(root.read("shadow").ends_with("coder:*:::::::\n"));
    }

    #[test]
    fn ensure_user_twice_writes_nothing() {
        let root = Root::debian();
        ensure_user(root.path(), &coder()).unwrap();
        let inodes: Vec<(u64, Vec<u8>)> = ["passwd", "group", "shadow", "gshadow"]
            .iter()
            .map(|n| {
                (
                    fs::metadata(root.etc(n)).unwrap().ino(),
                    fs::read(root.etc(n)).unwrap(),
                )
            })
            .collect();
        let out = ensure_user(root.path(), &coder()).unwrap();
        assert!(out.changes.is_empty(), "{:?}", out.changes);
        assert!(out.written.is_empty());
        let after: Vec<(u64, Vec<u8>)> = ["passwd", "group", "shadow", "gshadow"]
            .iter()
            .map(|n| {
                (
                    fs::metadata(root.etc(n)).unwrap().ino(),
                    fs::read(root.etc(n)).unwrap(),
                )
            })
            .collect();
        // Same inode: not even rewritten with identical bytes.
        assert_eq!(after, inodes);
        assert_eq!((out.uid, out.gid), (1000, 1000));
        assert_eq!(out.groups, vec!["docker"]);
    }

    #[test]
    fn ensure_user_writes_only_changed_files() {
        let root = Root::debian();
        fs::write(
            root.etc("passwd"),
            format!("{PASSWD_DEBIAN}coder:x:1000:1000::/home/coder:/bin/bash\n"),
        )
        .unwrap();
        let out = ensure_user(root.path(), &coder()).unwrap();
        assert_eq!(
            out.written,
            vec![PathBuf::from("/etc/group"), PathBuf::from("/etc/gshadow")]
        );
    }

    #[test]
    fn ensure_user_without_shadow_does_not_create_it() {
        let root = Root::debian();
        fs::remove_file(root.etc("shadow")).unwrap();
        fs::remove_file(root.etc("gshadow")).unwrap();
        let out = ensure_user(root.path(), &coder()).unwrap();
        assert_eq!(root.etc_listing(), vec!["group", "passwd"]);
        assert!(root
            .read("passwd")
            .ends_with("coder:*:1000:1000::/home/coder:/bin/bash\n"));
        assert_eq!(out.written.len(), 2);
    }

    #[test]
    fn ensure_user_creates_missing_passwd_and_group() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        let out = ensure_user(
            dir.path(),
            &UserSpec::new("coder", 1000, 1000, "/home/coder"),
        )
        .unwrap();
        let passwd = dir.path().join("etc/passwd");
        assert_eq!(
            fs::read_to_string(&passwd).unwrap(),
            "coder:*:1000:1000::/home/coder:/bin/sh\n"
        );
        assert_eq!(fs::metadata(&passwd).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(
            fs::metadata(dir.path().join("etc/group")).unwrap().mode() & 0o7777,
            0o644
        );
        // No shell at all in this root.
        assert!(out.warnings.iter().any(|w| w.contains("/bin/bash")));
    }

    #[test]
    fn ensure_user_picks_sh_when_bash_is_absent_or_not_executable() {
        let root = Root::debian();
        fs::set_permissions(
            root.path().join("bin/bash"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let out = ensure_user(root.path(), &coder()).unwrap();
        assert_eq!(out.shell, Path::new("/bin/sh"));
        assert!(root.read("passwd").ends_with(":/home/coder:/bin/sh\n"));
    }

    #[test]
    fn ensure_user_replaces_a_stale_temp_file() {
        let root = Root::debian();
        fs::write(root.etc(".passwd.hakim-new"), "garbage").unwrap();
        ensure_user(root.path(), &coder()).unwrap();
        assert!(root
            .read("passwd")
            .ends_with("coder:x:1000:1000::/home/coder:/bin/bash\n"));
        assert!(!root.etc(".passwd.hakim-new").exists());
    }

    #[test]
    fn ensure_user_refuses_to_replace_a_symlink() {
        let root = Root::debian();
        fs::rename(root.etc("passwd"), root.etc("passwd.real")).unwrap();
        std::os::unix::fs::symlink("passwd.real", root.etc("passwd")).unwrap();
        let err = ensure_user(root.path(), &coder()).unwrap_err();
        assert!(matches!(err, UserError::NotRegularFile { .. }), "{err:?}");
        assert!(fs::symlink_metadata(root.etc("passwd"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::read_to_string(root.etc("passwd.real")).unwrap(),
            PASSWD_DEBIAN
        );
    }

    #[test]
    fn ensure_user_with_etc_as_a_file_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("etc"), "not a directory").unwrap();
        let err = ensure_user(dir.path(), &coder()).unwrap_err();
        assert!(
            matches!(err, UserError::Io { op: "reading", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("etc/passwd"), "{err}");
    }

    #[test]
    fn ensure_user_without_etc_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_user(dir.path(), &coder()).unwrap_err();
        assert!(
            matches!(err, UserError::Io { op: "creating", .. }),
            "{err:?}"
        );
    }

    // Tests run as root, which ignores permission bits, and mounting a
    // read-only file system needs privileges we should not use here: the
    // mapping of EROFS/EACCES to a clear error is tested directly.
    #[test]
    fn read_only_errors_say_so() {
        for errno in [libc::EROFS, libc::EACCES, libc::EPERM] {
            let err = write_error(
                "creating",
                Path::new("/etc/.passwd.hakim-new"),
                io::Error::from_raw_os_error(errno),
            );
            assert!(matches!(err, UserError::NotWritable { .. }), "{err:?}");
            assert!(err.to_string().contains("/etc is not writable"), "{err}");
        }
        let err = write_error(
            "writing",
            Path::new("/etc/x"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(
            matches!(err, UserError::Io { op: "writing", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn inside_drops_parent_components() {
        assert_eq!(
            inside(Path::new("/r"), Path::new("/bin/bash")),
            Path::new("/r/bin/bash")
        );
        assert_eq!(
            inside(Path::new("/r"), Path::new("/../../bin/sh")),
            Path::new("/r/bin/sh")
        );
    }
}
