//! Decoding a stored customer record (MessagePack, see [`crate::model::Customer::encode`])
//! straight into the Rhai map a rule sees. Sweeps do this for every customer, so it
//! reads the bytes directly instead of going through serde's generic visitors.

use rhai::{Array, Dynamic, ImmutableString, Map, FLOAT, INT};
use rmp::Marker;

/// Why a record could not be decoded.
#[derive(Debug)]
pub struct DecodeError(pub String);

type Res<T> = Result<T, DecodeError>;

fn err<T>(msg: impl Into<String>) -> Res<T> {
    Err(DecodeError(msg.into()))
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if self.buf.len() < n {
            return err("record is truncated");
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Res<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn len(&mut self, bytes: usize) -> Res<usize> {
        Ok(match bytes {
            1 => self.u8()? as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    fn str(&mut self, len: usize) -> Res<&'a str> {
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError("string is not UTF-8".into()))
    }

    fn key(&mut self) -> Res<&'a str> {
        let m = Marker::from_u8(self.u8()?);
        let len = match m {
            Marker::FixStr(n) => n as usize,
            Marker::Str8 => self.len(1)?,
            Marker::Str16 => self.len(2)?,
            Marker::Str32 => self.len(4)?,
            other => return err(format!("map key is not a string: {other:?}")),
        };
        self.str(len)
    }

    fn map(&mut self, n: usize) -> Res<Map> {
        let mut m = Map::new();
        for _ in 0..n {
            let k = self.key()?;
            let v = self.value()?;
            m.insert(k.into(), v);
        }
        Ok(m)
    }

    fn array(&mut self, n: usize) -> Res<Array> {
        let mut a = Array::with_capacity(n.min(4096));
        for _ in 0..n {
            a.push(self.value()?);
        }
        Ok(a)
    }

    fn value(&mut self) -> Res<Dynamic> {
        let m = Marker::from_u8(self.u8()?);
        Ok(match m {
            Marker::Null => Dynamic::UNIT,
            Marker::True => Dynamic::TRUE,
            Marker::False => Dynamic::FALSE,
            Marker::FixPos(n) => Dynamic::from_int(INT::from(n)),
            Marker::FixNeg(n) => Dynamic::from_int(INT::from(n)),
            Marker::U8 => Dynamic::from_int(INT::from(self.u8()?)),
            Marker::U16 => Dynamic::from_int(INT::from(u16::from_be_bytes(self.be()?))),
            Marker::U32 => Dynamic::from_int(INT::from(u32::from_be_bytes(self.be()?))),
            Marker::U64 => {
                let v = u64::from_be_bytes(self.be()?);
                match INT::try_from(v) {
                    Ok(i) => Dynamic::from_int(i),
                    Err(_) => Dynamic::from_float(v as FLOAT),
                }
            }
            Marker::I8 => Dynamic::from_int(INT::from(i8::from_be_bytes(self.be()?))),
            Marker::I16 => Dynamic::from_int(INT::from(i16::from_be_bytes(self.be()?))),
            Marker::I32 => Dynamic::from_int(INT::from(i32::from_be_bytes(self.be()?))),
            Marker::I64 => Dynamic::from_int(i64::from_be_bytes(self.be()?)),
            Marker::F32 => Dynamic::from_float(FLOAT::from(f32::from_be_bytes(self.be()?))),
            Marker::F64 => Dynamic::from_float(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(n) => self.string(n as usize)?,
            Marker::Str8 => {
                let n = self.len(1)?;
                self.string(n)?
            }
            Marker::Str16 => {
                let n = self.len(2)?;
                self.string(n)?
            }
            Marker::Str32 => {
                let n = self.len(4)?;
                self.string(n)?
            }
            Marker::FixArray(n) => Dynamic::from_array(self.array(n as usize)?),
            Marker::Array16 => {
                let n = self.len(2)?;
                Dynamic::from_array(self.array(n)?)
            }
            Marker::Array32 => {
                let n = self.len(4)?;
                Dynamic::from_array(self.array(n)?)
            }
            Marker::FixMap(n) => Dynamic::from_map(self.map(n as usize)?),
            Marker::Map16 => {
                let n = self.len(2)?;
                Dynamic::from_map(self.map(n)?)
            }
            Marker::Map32 => {
                let n = self.len(4)?;
                Dynamic::from_map(self.map(n)?)
            }
            other => return err(format!("unexpected MessagePack marker {other:?}")),
        })
    }

    fn string(&mut self, n: usize) -> Res<Dynamic> {
        Ok(Dynamic::from(ImmutableString::from(self.str(n)?)))
    }
}

/// Decodes a stored customer record into a Rhai map.
pub fn customer_map(record: &[u8]) -> Res<Map> {
    let mut r = Reader { buf: record };
    match r.value()? {
        v if v.is_map() => Ok(v.cast::<Map>()),
        _ => err("record is not a map"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Customer;

    #[test]
    fn agrees_with_serde() {
        let c = crate::import::customer_from_json(serde_json::json!({
            "id": "c1", "email": "a@b.nl", "n": -5, "big": 18446744073709551615u64, "f": 1.5,
            "ok": true, "none": null, "tags": ["a", "b"], "nested": {"x": [1, {"y": "z"}]},
            "long": "x".repeat(300),
            "events": [{"kind": "order_created", "at": "2026-11-01T10:00:00Z", "data": {"total": 59.5}}]
        }))
        .unwrap();
        let bytes = Customer::encode(&c);
        let ours = customer_map(&bytes).unwrap();
        let theirs: Dynamic = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(
            format!("{:?}", Dynamic::from_map(ours)),
            format!("{theirs:?}")
        );
        assert!(customer_map(&bytes[..bytes.len() - 3]).is_err());
    }
}
