//! JSON for scripts: what the command line prints with `--json`.
//!
//! Every 64-bit integer (`u64`, `i64`, `usize`, and wider) is written as a
//! decimal string, so tools that read JSON numbers as doubles (JavaScript,
//! `jq`) never round a count, a byte figure or a digest:
//! `"pages": {"raw": "123456"}`. Integers of 32 bits and less (rounds,
//! percentages, lane counts) and floats (milliseconds, rates, ratios) stay
//! numbers. The rule follows the Rust type, not the value, so a field is
//! always one JSON type.
//!
//! It is one serializer adapter ([`to_string`], [`to_string_pretty`])
//! around `serde_json`'s, so every type printed through it follows the
//! rule, the engine's and the VM's included, with no per-field markup.
//! Print typed values: a `serde_json::Value` has forgotten its Rust types
//! (every whole number in it is 64-bit) and would print all of them as
//! strings.
//!
//! Reading goes the other way ([`from_str`], [`from_slice`]): a script
//! line read back into the same Rust type, a 64-bit integer taken from its
//! decimal string. [`MigrateLine`] is the type of each
//! line `ferry migrate --json` prints.
//!
//! The control socket itself carries counts as JSON numbers (both of its
//! ends are typed Rust, which reads them exactly); only the values that use
//! all 64 bits (the memory digest, nanosecond timestamps) are strings there
//! too (see [`crate::protocol`]).
//!
//! ```
//! #[derive(serde::Serialize)]
//! struct Round { round: u32, wire_bytes: u64, ms: f64 }
//! let line = ferry_control::json::to_string(&Round { round: 3, wire_bytes: 1 << 60, ms: 1.5 }).unwrap();
//! assert_eq!(line, r#"{"round":3,"wire_bytes":"1152921504606846976","ms":1.5}"#);
//! ```

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
use serde::ser::{self, Serialize, Serializer};
use serde::Deserialize;

use crate::protocol::{Event, GuestHome, Phase, Summary};

/// One line of `ferry migrate --json`: an event while the migration runs,
/// then its outcome as the last line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrateLine {
    /// A step of the migration (`"event":"connected"`, `"round_finished"`, ...).
    Event(Box<Event>),
    /// The last line: the summary or the failure.
    Outcome(MigrateOutcome),
}

/// The last line of `ferry migrate --json`: the summary or the failure.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MigrateOutcome {
    /// Completed.
    Summary {
        /// The source's account.
        summary: Box<Summary>,
    },
    /// Failed or was cancelled.
    Failed {
        /// Where it ended.
        phase: Phase,
        /// Why.
        error: Option<String>,
        /// Where the guest is.
        guest: GuestHome,
    },
}

/// `value` as one line of JSON, 64-bit integers as strings.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    value.serialize(Wide(&mut serde_json::Serializer::new(&mut out)))?;
    String::from_utf8(out).map_err(ser::Error::custom)
}

/// `value` as indented JSON, 64-bit integers as strings.
pub fn to_string_pretty<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    value.serialize(Wide(&mut serde_json::Serializer::pretty(&mut out)))?;
    String::from_utf8(out).map_err(ser::Error::custom)
}

/// Reads a `T` from what [`to_string`] or [`to_string_pretty`] wrote: a
/// 64-bit or wider integer from its decimal string. Such an integer
/// written as a JSON number is refused: it is not what ferry writes, and
/// may have been rounded by a tool that reads numbers as doubles. Smaller
/// integers are read from numbers (or strings).
///
/// Inside an internally tagged or untagged enum serde buffers a value
/// before it knows its Rust type, so there every string that is a decimal
/// integer is read as a number, a number is accepted for a 64-bit
/// integer, and a `String` field holding only digits does not read back
/// (ferry's types have none).
pub fn from_str<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = T::deserialize(Read(&mut de))?;
    de.end()?;
    Ok(value)
}

/// [`from_str`] of bytes.
pub fn from_slice<'a, T: Deserialize<'a>>(text: &'a [u8]) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = T::deserialize(Read(&mut de))?;
    de.end()?;
    Ok(value)
}

/// A deserializer that reads a decimal string where an integer (or
/// anything, see [`from_str`]) is asked for, and passes everything else to
/// the one inside.
struct Read<D>(D);

/// A visitor (or one of the access parts it is handed) seen through
/// [`Read`].
struct ReadVisitor<V> {
    inner: V,
    mode: Mode,
}

/// What a [`ReadVisitor`] does with the integers it meets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A value that may nest: nothing (its parts are read through [`Read`]).
    Nested,
    /// An integer of 32 bits or less, or a value of a type serde does not
    /// know yet: a decimal string is an integer, and so is a number.
    Any,
    /// A 64-bit or wider integer: written as a decimal string, so a number
    /// is refused (it may have been rounded on its way).
    Wide,
}

/// A seed seen through [`Read`].
struct ReadSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for ReadSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Read(d))
    }
}

/// `text` as the integer it spells in decimal, if it spells one.
fn decimal(text: &str) -> Option<Integer> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Ok(n) = text.parse() {
        return Some(Integer::U64(n));
    }
    if let Ok(n) = text.parse() {
        return Some(Integer::I64(n));
    }
    if let Ok(n) = text.parse() {
        return Some(Integer::U128(n));
    }
    text.parse().ok().map(Integer::I128)
}

/// An integer read from a string.
enum Integer {
    U64(u64),
    I64(i64),
    U128(u128),
    I128(i128),
}

impl Integer {
    fn visit<'de, V: Visitor<'de>, E: de::Error>(self, v: V) -> Result<V::Value, E> {
        match self {
            Integer::U64(n) => v.visit_u64(n),
            Integer::I64(n) => v.visit_i64(n),
            Integer::U128(n) => v.visit_u128(n),
            Integer::I128(n) => v.visit_i128(n),
        }
    }
}

impl<V> ReadVisitor<V> {
    fn new(inner: V, mode: Mode) -> Self {
        Self { inner, mode }
    }

    fn nested(inner: V) -> Self {
        Self::new(inner, Mode::Nested)
    }

    /// A number where a decimal string belongs.
    fn refuse<E: de::Error>(&self, n: de::Unexpected<'_>) -> Option<E> {
        (self.mode == Mode::Wide).then(|| {
            E::invalid_type(
                n,
                &"a decimal string (64-bit integers are written as strings)",
            )
        })
    }
}

macro_rules! visit_pass {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        })*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for ReadVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.expecting(f)
    }

    visit_pass! {
        visit_bool(bool), visit_i8(i8), visit_i16(i16), visit_i32(i32),
        visit_u8(u8), visit_u16(u16), visit_u32(u32), visit_f32(f32), visit_f64(f64), visit_char(char),
        visit_bytes(&[u8]), visit_borrowed_bytes(&'de [u8]), visit_byte_buf(Vec<u8>),
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<V::Value, E> {
        match self.refuse(de::Unexpected::Unsigned(v)) {
            Some(e) => Err(e),
            None => self.inner.visit_u64(v),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<V::Value, E> {
        match self.refuse(de::Unexpected::Signed(v)) {
            Some(e) => Err(e),
            None => self.inner.visit_i64(v),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<V::Value, E> {
        match self.refuse(de::Unexpected::Other("a number")) {
            Some(e) => Err(e),
            None => self.inner.visit_u128(v),
        }
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<V::Value, E> {
        match self.refuse(de::Unexpected::Other("a number")) {
            Some(e) => Err(e),
            None => self.inner.visit_i128(v),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        match decimal(v).filter(|_| self.mode != Mode::Nested) {
            Some(n) => n.visit(self.inner),
            None => self.inner.visit_str(v),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        match decimal(v).filter(|_| self.mode != Mode::Nested) {
            Some(n) => n.visit(self.inner),
            None => self.inner.visit_borrowed_str(v),
        }
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        match decimal(&v).filter(|_| self.mode != Mode::Nested) {
            Some(n) => n.visit(self.inner),
            None => self.inner.visit_string(v),
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Read(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Read(d))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(ReadVisitor::nested(seq))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(ReadVisitor::nested(map))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(ReadVisitor::nested(data))
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for ReadVisitor<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(ReadSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for ReadVisitor<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(ReadSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for ReadVisitor<A> {
    type Error = A::Error;
    type Variant = ReadVisitor<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.inner.variant_seed(seed)?;
        Ok((value, ReadVisitor::nested(variant)))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for ReadVisitor<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.newtype_variant_seed(ReadSeed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
        self.inner.tuple_variant(len, ReadVisitor::nested(v))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, A::Error> {
        self.inner.struct_variant(fields, ReadVisitor::nested(v))
    }
}

/// Deserializer methods that may meet a 64-bit integer written as a string.
macro_rules! read_numbers {
    ($mode:expr; $($method:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_any(ReadVisitor::new(v, $mode))
        })*
    };
}

/// Deserializer methods whose values hold no integer and nothing nested.
macro_rules! read_pass {
    ($($method:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.$method(v)
        })*
    };
}

/// Deserializer methods whose values may nest.
macro_rules! read_nested {
    ($($method:ident),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.$method(ReadVisitor::nested(v))
        })*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Read<D> {
    type Error = D::Error;

    read_numbers! {
        Mode::Any; deserialize_any, deserialize_i8, deserialize_i16, deserialize_i32,
        deserialize_u8, deserialize_u16, deserialize_u32,
    }

    read_numbers! {
        Mode::Wide; deserialize_i64, deserialize_i128, deserialize_u64, deserialize_u128,
    }

    read_pass! {
        deserialize_bool, deserialize_f32, deserialize_f64, deserialize_char, deserialize_str,
        deserialize_string, deserialize_bytes, deserialize_byte_buf, deserialize_unit,
        deserialize_identifier, deserialize_ignored_any,
    }

    read_nested! { deserialize_option, deserialize_seq, deserialize_map }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_unit_struct(name, v)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_newtype_struct(name, ReadVisitor::nested(v))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_tuple(len, ReadVisitor::nested(v))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_tuple_struct(name, len, ReadVisitor::nested(v))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_struct(name, fields, ReadVisitor::nested(v))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_enum(name, variants, ReadVisitor::nested(v))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// A serializer (or one of its compound parts) that writes 64-bit and
/// wider integers as strings and passes everything else to the one inside.
struct Wide<S>(S);

/// A value to serialize through [`Wide`].
struct Through<'a, T: ?Sized>(&'a T);

impl<T: Serialize + ?Sized> Serialize for Through<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(Wide(s))
    }
}

macro_rules! pass {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<S::Ok, S::Error> {
            self.0.$method(v)
        })*
    };
}

macro_rules! as_string {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<S::Ok, S::Error> {
            self.0.collect_str(&v)
        })*
    };
}

impl<S: Serializer> Serializer for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Wide<S::SerializeSeq>;
    type SerializeTuple = Wide<S::SerializeTuple>;
    type SerializeTupleStruct = Wide<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Wide<S::SerializeTupleVariant>;
    type SerializeMap = Wide<S::SerializeMap>;
    type SerializeStruct = Wide<S::SerializeStruct>;
    type SerializeStructVariant = Wide<S::SerializeStructVariant>;

    pass! {
        serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_u8(u8), serialize_u16(u16), serialize_u32(u32),
        serialize_f32(f32), serialize_f64(f64), serialize_char(char),
        serialize_str(&str), serialize_bytes(&[u8]),
    }

    as_string! {
        serialize_i64(i64), serialize_u64(u64), serialize_i128(i128), serialize_u128(u128),
    }

    fn serialize_none(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_none()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_some(&Through(v))
    }

    fn serialize_unit(self) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit()
    }

    fn serialize_unit_struct(self, name: &'static str) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit_struct(name)
    }

    fn serialize_unit_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_unit_variant(name, index, variant)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        v: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_struct(name, &Through(v))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0
            .serialize_newtype_variant(name, index, variant, &Through(v))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        self.0.serialize_seq(len).map(Wide)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        self.0.serialize_tuple(len).map(Wide)
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        self.0.serialize_tuple_struct(name, len).map(Wide)
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        self.0
            .serialize_tuple_variant(name, index, variant, len)
            .map(Wide)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        self.0.serialize_map(len).map(Wide)
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        self.0.serialize_struct(name, len).map(Wide)
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        self.0
            .serialize_struct_variant(name, index, variant, len)
            .map(Wide)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

impl<S: ser::SerializeSeq> ser::SerializeSeq for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_element(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeTuple> ser::SerializeTuple for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_element(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeTupleStruct> ser::SerializeTupleStruct for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_field(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeTupleVariant> ser::SerializeTupleVariant for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_field(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeMap> ser::SerializeMap for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), S::Error> {
        self.0.serialize_key(&Through(k))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.0.serialize_value(&Through(v))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeStruct> ser::SerializeStruct for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), S::Error> {
        self.0.serialize_field(key, &Through(v))
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.0.skip_field(key)
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

impl<S: ser::SerializeStructVariant> ser::SerializeStructVariant for Wide<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), S::Error> {
        self.0.serialize_field(key, &Through(v))
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
        self.0.skip_field(key)
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.0.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Event, Limits, MigrationReport, Phase, Reply, Role};
    use crate::GuestHome;
    use ferry_engine::encode::EncodingCounts;

    fn report() -> MigrationReport {
        MigrationReport {
            role: Role::Source,
            phase: Phase::Copying,
            guest: GuestHome::Migrating,
            to: Some("h:1".into()),
            round: 2,
            bytes_left: u64::MAX,
            wire_bytes: 5,
            dirty_rate_pages_per_sec: 1.5,
            bandwidth_bytes_per_sec: 2.0,
            expected_downtime_ms: 0.25,
            throttle_percent: 40,
            decision: None,
            limits: Limits {
                max_bandwidth: Some(1 << 40),
                ..Limits::default()
            },
            elapsed_ms: 3.0,
            summary: None,
            received: None,
            error: None,
        }
    }

    #[test]
    fn sixty_four_bit_integers_are_strings_and_the_rest_keeps_its_type() {
        let line = to_string(&report()).unwrap();
        for field in [
            r#""bytes_left":"18446744073709551615""#,
            r#""wire_bytes":"5""#,
            r#""limits":{"max_bandwidth":"1099511627776"}"#,
            r#""round":2,"#,
            r#""throttle_percent":40,"#,
            r#""expected_downtime_ms":0.25,"#,
            r#""phase":"copying","#,
        ] {
            assert!(line.contains(field), "{field} not in {line}");
        }
        assert!(
            !line.contains("summary"),
            "skipped fields stay skipped: {line}"
        );
    }

    #[test]
    fn tagged_and_nested_types_follow_the_rule() {
        let ev = Event::RoundProgress {
            round: 1,
            pages_done: 7,
            pages_total: 9,
            wire_bytes: 1 << 53,
        };
        assert_eq!(
            to_string(&ev).unwrap(),
            r#"{"event":"round_progress","round":1,"pages_done":"7","pages_total":"9","wire_bytes":"9007199254740992"}"#
        );
        let reply = Reply::Event(Box::new(ev));
        assert_eq!(
            to_string(&reply).unwrap(),
            r#"{"reply":"event","event":"round_progress","round":1,"pages_done":"7","pages_total":"9","wire_bytes":"9007199254740992"}"#
        );
        #[derive(serde::Serialize)]
        struct Summary {
            pages: EncodingCounts,
        }
        let pages = EncodingCounts {
            raw: 123_456,
            ..EncodingCounts::default()
        };
        let pretty = to_string_pretty(&Summary { pages }).unwrap();
        assert!(pretty.contains(r#""raw": "123456""#), "{pretty}");
        assert!(pretty.contains(r#""zero": "0""#), "{pretty}");
        assert_eq!(to_string(&[-1i64, 2]).unwrap(), r#"["-1","2"]"#);
    }

    #[test]
    fn what_is_written_reads_back_as_the_same_value() {
        let report = report();
        assert_eq!(
            from_str::<MigrationReport>(&to_string(&report).unwrap()).unwrap(),
            report
        );
        let pretty = to_string_pretty(&report).unwrap();
        assert_eq!(
            from_slice::<MigrationReport>(pretty.as_bytes()).unwrap(),
            report
        );
        // Tagged: serde buffers the fields before it knows their types.
        let ev = Event::RoundProgress {
            round: 1,
            pages_done: 7,
            pages_total: 9,
            wire_bytes: u64::MAX,
        };
        let line = MigrateLine::Event(Box::new(ev.clone()));
        assert_eq!(from_str::<Event>(&to_string(&ev).unwrap()).unwrap(), ev);
        assert_eq!(
            from_str::<MigrateLine>(&to_string(&line).unwrap()).unwrap(),
            line
        );
        let failed = MigrateLine::Outcome(MigrateOutcome::Failed {
            phase: Phase::Failed,
            error: Some("lane 2 cut".into()),
            guest: GuestHome::Here,
        });
        assert_eq!(
            from_str::<MigrateLine>(&to_string(&failed).unwrap()).unwrap(),
            failed
        );
        assert_eq!(from_str::<Vec<i64>>(r#"["-1","2"]"#).unwrap(), [-1, 2]);
        assert_eq!(
            from_str::<(u128, String)>(r#"["340282366920938463463374607431768211455","7"]"#)
                .unwrap(),
            (u128::MAX, "7".to_owned())
        );
    }

    #[test]
    fn a_string_that_is_no_integer_is_refused_where_an_integer_belongs() {
        for bad in [
            r#""12a""#,
            r#""""#,
            r#""-""#,
            r#""+5""#,
            r#""18446744073709551616""#,
            r#""1.5""#,
        ] {
            assert!(from_str::<u64>(bad).is_err(), "{bad}");
        }
        assert!(from_str::<u8>(r#""256""#).is_err());
        // A 64-bit figure as a number is not what ferry writes.
        assert!(from_str::<u64>("5").is_err());
        assert!(from_str::<Option<i64>>("-5").is_err());
        assert!(from_str::<Vec<usize>>("[1]").is_err());
        assert_eq!(from_str::<u8>("5").unwrap(), 5);
        assert!(from_str::<MigrationReport>("{").is_err());
        assert!(from_str::<u64>(r#""5" trailing"#).is_err());
    }
}
