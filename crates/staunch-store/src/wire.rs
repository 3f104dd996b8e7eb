//! XenStore's wire format: a 16-byte header (type, request id, transaction
//! id, payload length; host byte order) and a payload of at most 4096 bytes,
//! usually NUL-separated strings. Parsing never trusts the peer: every
//! length and string is checked and errors are values.

use std::io::Read;

pub const HEADER_LEN: usize = 16;
/// XENSTORE_PAYLOAD_MAX.
pub const PAYLOAD_MAX: usize = 4096;
/// XENSTORE_ABS_PATH_MAX and XENSTORE_REL_PATH_MAX.
pub const ABS_PATH_MAX: usize = 3072;
pub const REL_PATH_MAX: usize = 2048;

/// Message types (xs_wire.h numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl Op {
    pub fn from_u32(v: u32) -> Option<Op> {
        use Op::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// XenStore's error replies, by the names clients match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XsError {
    #[error("EINVAL")]
    Inval,
    #[error("EACCES")]
    Acces,
    #[error("EEXIST")]
    Exist,
    #[error("EISDIR")]
    IsDir,
    #[error("ENOENT")]
    NoEnt,
    #[error("ENOMEM")]
    NoMem,
    #[error("ENOSPC")]
    NoSpc,
    #[error("EIO")]
    Io,
    #[error("ENOTEMPTY")]
    NotEmpty,
    #[error("ENOSYS")]
    NoSys,
    #[error("EROFS")]
    RoFs,
    #[error("EBUSY")]
    Busy,
    #[error("EAGAIN")]
    Again,
    #[error("EISCONN")]
    IsConn,
    #[error("E2BIG")]
    TooBig,
    #[error("EPERM")]
    Perm,
    #[error("EQUOTA")]
    Quota,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header { ty: w(0), req_id: w(4), tx_id: w(8), len: w(12) }
    }

    pub fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        for (i, v) in [self.ty, self.req_id, self.tx_id, self.len].into_iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// One request as read off a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub header: Header,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("payload of {0} bytes exceeds {PAYLOAD_MAX}")]
    TooLong(u32),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Read one message. A header announcing more than `PAYLOAD_MAX` is an
/// error before any payload is read (the peer cannot make us allocate).
pub fn read_msg(r: &mut impl Read) -> Result<Msg, ReadError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(e.into()),
    }
    let header = Header::parse(&h);
    if header.len as usize > PAYLOAD_MAX {
        return Err(ReadError::TooLong(header.len));
    }
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload)?;
    Ok(Msg { header, payload })
}

/// Encode a reply (or a watch event) of type `ty`.
pub fn encode(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header { ty, req_id, tx_id, len: payload.len() as u32 };
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&h.bytes());
    v.extend_from_slice(payload);
    v
}

/// The payload's NUL-terminated strings. The last one may lack its NUL
/// (values of `write` are raw bytes after the path; callers take those
/// with [`split_first`]).
pub fn strings(payload: &[u8]) -> Result<Vec<&str>, XsError> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == 0).map(|s| std::str::from_utf8(s).map_err(|_| XsError::Inval)).collect()
}

/// The first NUL-terminated string and the raw bytes after it.
pub fn split_first(payload: &[u8]) -> Result<(&str, &[u8]), XsError> {
    let nul = payload.iter().position(|&b| b == 0).ok_or(XsError::Inval)?;
    let s = std::str::from_utf8(&payload[..nul]).map_err(|_| XsError::Inval)?;
    Ok((s, &payload[nul + 1..]))
}

/// The single string argument of most requests.
pub fn one_string(payload: &[u8]) -> Result<&str, XsError> {
    match strings(payload)?.as_slice() {
        [s] => Ok(s),
        _ => Err(XsError::Inval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_limits() {
        let m = encode(Op::Read as u32, 7, 3, b"/a\0");
        let got = read_msg(&mut &m[..]).unwrap();
        assert_eq!(got.header, Header { ty: 2, req_id: 7, tx_id: 3, len: 3 });
        assert_eq!(got.payload, b"/a\0");
        let mut huge = Header { ty: 2, req_id: 0, tx_id: 0, len: 1 << 30 }.bytes().to_vec();
        huge.extend_from_slice(b"xx");
        assert!(matches!(read_msg(&mut &huge[..]), Err(ReadError::TooLong(_))));
        assert!(matches!(read_msg(&mut &m[..10]), Err(ReadError::Closed)));
        assert!(matches!(read_msg(&mut &m[..17]), Err(ReadError::Io(_))));
    }

    #[test]
    fn payload_strings() {
        assert_eq!(strings(b"a\0b\0").unwrap(), vec!["a", "b"]);
        assert_eq!(strings(b"").unwrap(), Vec::<&str>::new());
        assert!(strings(b"\xff\0").is_err());
        assert_eq!(split_first(b"/p\0va\0lue").unwrap(), ("/p", &b"va\0lue"[..]));
        assert!(split_first(b"nonul").is_err());
        assert!(one_string(b"a\0b\0").is_err());
    }

    /// Random bytes never panic the parser.
    #[test]
    fn random_input_never_panics() {
        let mut x = 0x2545f4914f6cdd1du64;
        for _ in 0..20_000 {
            let n = (x % 64) as usize;
            let mut b = Vec::with_capacity(n);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(x as u8);
            }
            if let Ok(m) = read_msg(&mut &b[..]) {
                let _ = strings(&m.payload);
                let _ = split_first(&m.payload);
                let _ = Op::from_u32(m.header.ty);
            }
        }
    }
}
