/// A strict JSON reader that finds an object's top-level members and the exact bytes of each
/// value, without building a tree: the task's `payload` is forwarded byte for byte, and a task
/// costs one pass over its body.
public enum JSONScan {
    public enum Kind: Sendable, Equatable { case object, array, string, number, bool, null }

    public struct Member: Sendable {
        public var kind: Kind
        /// The value's bytes in the document (for a string: including the quotes).
        public var range: Range<Int>
    }

    public struct Failure: Error, Sendable, CustomStringConvertible {
        public var offset: Int
        public var reason: String
        public var description: String { "\(self.reason) at byte \(self.offset)" }
    }

    /// The members of a top-level object (the last one wins on duplicate keys).
    public static func members(_ bytes: [UInt8]) throws(Failure) -> [String: Member] {
        var members: [String: Member] = [:]
        try self.forEachMember(bytes) { (keyRange: Range<Int>, member: Member) throws(Failure) in
            members[try Self.decodeString(bytes, keyRange)] = member
        }
        return members
    }

    /// Calls `body` with each top-level member's key (its range, quotes included) and value,
    /// without building strings or a dictionary.
    public static func forEachMember(_ bytes: [UInt8], _ body: (Range<Int>, Member) throws(Failure) -> Void) throws(Failure) {
        try self.forEachMember(bytes, in: bytes.indices, body)
    }

    /// `forEachMember` over the object at `range` of `bytes` (ranges given to `body`, and offsets
    /// in a failure, are in `bytes`):
    /// a value inside a document is read in place, not copied out.
    /// `validated`: the range is part of a document read strictly already (see ``Scanner/validated``).
    public static func forEachMember(_ bytes: [UInt8], in range: Range<Int>, validated: Bool = false,
                                     _ body: (Range<Int>, Member) throws(Failure) -> Void) throws(Failure) {
        var scanner = Scanner(bytes: bytes, index: range.lowerBound, end: range.upperBound, validated: validated)
        scanner.skipSpace()
        guard scanner.peek == UInt8(ascii: "{") else {
            if scanner.index >= range.upperBound { throw Failure(offset: range.lowerBound, reason: "empty body") }
            throw Failure(offset: scanner.index, reason: "expected a JSON object")
        }
        scanner.index += 1
        scanner.skipSpace()
        if scanner.peek == UInt8(ascii: "}") {
            scanner.index += 1
        } else {
            while true {
                scanner.skipSpace()
                let keyStart = scanner.index
                try scanner.string()
                let keyRange = keyStart..<scanner.index
                scanner.skipSpace()
                try scanner.expect(UInt8(ascii: ":"))
                scanner.skipSpace()
                let valueStart = scanner.index
                let kind = try scanner.value(depth: 0)
                try body(keyRange, Member(kind: kind, range: valueStart..<scanner.index))
                scanner.skipSpace()
                if scanner.peek == UInt8(ascii: ",") { scanner.index += 1; continue }
                try scanner.expect(UInt8(ascii: "}"))
                break
            }
        }
        scanner.skipSpace()
        guard scanner.index == range.upperBound else { throw Failure(offset: scanner.index, reason: "unexpected data after the object") }
    }

    /// Calls `body` with each element of a top-level array (its kind and exact bytes).
    public static func forEachElement(_ bytes: [UInt8], _ body: (Member) throws(Failure) -> Void) throws(Failure) {
        try self.forEachElement(bytes, in: bytes.indices, body)
    }

    /// `forEachElement` over the array at `range` of `bytes` (ranges given to `body` are in `bytes`).
    public static func forEachElement(_ bytes: [UInt8], in range: Range<Int>, validated: Bool = false,
                                      _ body: (Member) throws(Failure) -> Void) throws(Failure) {
        var scanner = Scanner(bytes: bytes, index: range.lowerBound, end: range.upperBound, validated: validated)
        scanner.skipSpace()
        guard scanner.peek == UInt8(ascii: "[") else {
            if scanner.index >= range.upperBound { throw Failure(offset: range.lowerBound, reason: "empty body") }
            throw Failure(offset: scanner.index, reason: "expected a JSON array")
        }
        scanner.index += 1
        scanner.skipSpace()
        if scanner.peek == UInt8(ascii: "]") {
            scanner.index += 1
        } else {
            while true {
                scanner.skipSpace()
                let start = scanner.index
                let kind = try scanner.value(depth: 0)
                try body(Member(kind: kind, range: start..<scanner.index))
                scanner.skipSpace()
                if scanner.peek == UInt8(ascii: ",") { scanner.index += 1; continue }
                try scanner.expect(UInt8(ascii: "]"))
                break
            }
        }
        scanner.skipSpace()
        guard scanner.index == range.upperBound else { throw Failure(offset: scanner.index, reason: "unexpected data after the array") }
    }

    /// An object's members found in place, for the few keys a reader asks about: no dictionary
    /// and no key strings. A key is matched on its bytes, or on its text when it is written with
    /// escapes (decoded once, when the object is read); of duplicate keys the last one wins (as in
    /// ``members(_:)``).
    public struct Fields {
        public let bytes: [UInt8]
        private var entries: [(key: Range<Int>, decoded: String?, member: Member)] = []

        /// The object at `range` of `bytes` (all of it by default); `validated`: see
        /// ``JSONScan/forEachMember(_:in:validated:_:)``.
        public init(_ bytes: [UInt8], in range: Range<Int>? = nil, validated: Bool = false) throws(Failure) {
            self.bytes = bytes
            var entries: [(key: Range<Int>, decoded: String?, member: Member)] = []
            entries.reserveCapacity(8)
            try JSONScan.forEachMember(bytes, in: range ?? bytes.indices, validated: validated) { (key: Range<Int>, member: Member) throws(Failure) in
                let decoded = bytes[key].contains(UInt8(ascii: "\\")) ? try JSONScan.decodeString(bytes, key) : nil
                entries.append((key, decoded, member))
            }
            self.entries = entries
        }

        private func entry(_ index: Int, is key: StaticString) -> Bool {
            let entry = self.entries[index]
            guard let decoded = entry.decoded else { return JSONScan.keyEquals(self.bytes, entry.key, key) }
            return decoded.utf8.elementsEqual(UnsafeBufferPointer(start: key.utf8Start, count: key.utf8CodeUnitCount))
        }

        public subscript(key: StaticString) -> Member? {
            for index in self.entries.indices.reversed() where self.entry(index, is: key) { return self.entries[index].member }
            return nil
        }

        /// The first key (in sorted order) that is not one of `known`, decoded; nil when all are known.
        public func firstUnknownKey(_ known: [StaticString]) -> String? {
            var first: String?
            for index in self.entries.indices where !known.contains(where: { self.entry(index, is: $0) }) {
                let entry = self.entries[index]
                let key = entry.decoded ?? String(decoding: self.bytes[(entry.key.lowerBound + 1)..<(entry.key.upperBound - 1)], as: UTF8.self)
                if first.map({ key < $0 }) ?? true { first = key }
            }
            return first
        }

        /// The text of the string member at `member` (nil when it is not a valid string).
        public func string(_ member: Member) -> String? {
            guard member.kind == .string else { return nil }
            return try? JSONScan.decodeString(self.bytes, member.range)
        }
    }

    /// The whole number at `member` when it is one (no fraction, no exponent) in `range`.
    public static func integer(_ bytes: [UInt8], _ member: Member?, in range: ClosedRange<Int>) -> Int? {
        guard let member, member.kind == .number, member.range.count <= 18,
              let value = Int(String(decoding: bytes[member.range], as: UTF8.self)), range.contains(value) else { return nil }
        return value
    }

    /// True when the string at `range` (quotes included) is exactly `key`, with no escapes.
    public static func keyEquals(_ bytes: [UInt8], _ range: Range<Int>, _ key: StaticString) -> Bool {
        let count = key.utf8CodeUnitCount
        guard range.count == count + 2 else { return false }
        let start = key.utf8Start
        for i in 0..<count where bytes[range.lowerBound + 1 + i] != start[i] { return false }
        return true
    }

    /// True when `bytes` is one complete JSON value (surrounding whitespace allowed).
    public static func isValid(_ bytes: [UInt8]) -> Bool {
        var scanner = Scanner(bytes: bytes, index: 0, end: bytes.count)
        scanner.skipSpace()
        do throws(Failure) {
            _ = try scanner.value(depth: 0)
        } catch {
            return false
        }
        scanner.skipSpace()
        return scanner.index == bytes.count
    }

    /// The text of a JSON string value (range including quotes).
    public static func decodeString(_ bytes: [UInt8], _ range: Range<Int>) throws(Failure) -> String {
        let inner = (range.lowerBound + 1)..<(range.upperBound - 1)
        if !bytes[inner].contains(UInt8(ascii: "\\")) { return String(decoding: bytes[inner], as: UTF8.self) }
        var out: [UInt8] = []
        out.reserveCapacity(inner.count)
        var i = inner.lowerBound
        while i < inner.upperBound {
            let b = bytes[i]
            guard b == UInt8(ascii: "\\") else { out.append(b); i += 1; continue }
            i += 1
            switch bytes[i] {
            case UInt8(ascii: "n"): out.append(10)
            case UInt8(ascii: "t"): out.append(9)
            case UInt8(ascii: "r"): out.append(13)
            case UInt8(ascii: "b"): out.append(8)
            case UInt8(ascii: "f"): out.append(12)
            case UInt8(ascii: "u"):
                var code = try Self.hex4(bytes, i + 1)
                i += 4
                if (0xD800...0xDBFF).contains(code), i + 6 < inner.upperBound, bytes[i + 1] == UInt8(ascii: "\\"), bytes[i + 2] == UInt8(ascii: "u") {
                    let low = try Self.hex4(bytes, i + 3)
                    if (0xDC00...0xDFFF).contains(low) {
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        i += 6
                    }
                }
                out.append(contentsOf: Array(String(Character(Unicode.Scalar(code) ?? "\u{FFFD}")).utf8))
            default: out.append(bytes[i])  // \" \\ \/
            }
            i += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func hex4(_ bytes: [UInt8], _ at: Int) throws(Failure) -> UInt32 {
        guard at + 4 <= bytes.count else { throw Failure(offset: at, reason: "bad \\u escape") }
        var value: UInt32 = 0
        for b in bytes[at..<(at + 4)] {
            value <<= 4
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): value |= UInt32(b - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): value |= UInt32(b - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): value |= UInt32(b - UInt8(ascii: "A") + 10)
            default: throw Failure(offset: at, reason: "bad \\u escape")
            }
        }
        return value
    }

    /// A JSON string literal for `text`.
    public static func quote(_ text: String) -> String {
        var text = text
        return text.withUTF8 { bytes -> String in
            // Most texts (ids, URLs, queue names) need no escape: one allocation.
            guard Self.needsEscape(bytes) else {
                return String(unsafeUninitializedCapacity: bytes.count + 2) { out in
                    out[0] = UInt8(ascii: "\"")
                    _ = UnsafeMutableBufferPointer(rebasing: out[1...]).initialize(fromContentsOf: bytes)
                    out[bytes.count + 1] = UInt8(ascii: "\"")
                    return bytes.count + 2
                }
            }
            var out: [UInt8] = []
            out.reserveCapacity(bytes.count + 16)
            Self.appendQuoted(bytes, to: &out)
            return String(decoding: out, as: UTF8.self)
        }
    }

    /// Appends `text` as a JSON string literal to `out` (no allocation of its own when `out` has room).
    public static func appendQuoted(_ text: String, to out: inout [UInt8]) {
        var text = text
        text.withUTF8 { Self.appendQuoted($0, to: &out) }
    }

    /// Whether a JSON string literal of these bytes needs an escape (a control character, `"` or `\\`).
    static func needsEscape(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        bytes.contains { $0 < 0x20 || $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }
    }

    static func appendQuoted(_ bytes: UnsafeBufferPointer<UInt8>, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        guard Self.needsEscape(bytes) else {
            out.append(contentsOf: bytes)
            out.append(UInt8(ascii: "\""))
            return
        }
        // Byte by byte: every byte of a multi-byte UTF-8 sequence is >= 0x80 and copied as is.
        let hex: StaticString = "0123456789abcdef"
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "\""): out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "\""))
            case UInt8(ascii: "\\"): out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "\\"))
            case 0x0A: out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "n"))
            case 0x0D: out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "r"))
            case 0x09: out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "t"))
            case 0..<0x20:
                out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "u")); out.append(UInt8(ascii: "0")); out.append(UInt8(ascii: "0"))
                out.append(hex.utf8Start[Int(byte >> 4)]); out.append(hex.utf8Start[Int(byte & 0xF)])
            default: out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    struct Scanner {
        let bytes: [UInt8]
        var index: Int
        /// Where the text being read ends (`bytes.count` for a whole document).
        let end: Int
        /// The text was checked already (it is part of a document a strict pass accepted): values
        /// are skipped by their structure without checking escapes, UTF-8 or number syntax again.
        var validated = false

        var peek: UInt8? { self.index < self.end ? self.bytes[self.index] : nil }

        mutating func skipSpace() {
            while self.index < self.end {
                switch self.bytes[self.index] {
                case 0x20, 0x0A, 0x0D, 0x09: self.index += 1
                default: return
                }
            }
        }

        mutating func expect(_ byte: UInt8) throws(Failure) {
            guard self.peek == byte else {
                throw Failure(offset: self.index, reason: "expected '\(Character(Unicode.Scalar(byte)))'")
            }
            self.index += 1
        }

        mutating func value(depth: Int) throws(Failure) -> Kind {
            guard depth < 512 else { throw Failure(offset: self.index, reason: "nested too deeply") }
            guard let byte = self.peek else { throw Failure(offset: self.index, reason: "unexpected end") }
            switch byte {
            case UInt8(ascii: "{"):
                self.index += 1
                self.skipSpace()
                if self.peek == UInt8(ascii: "}") { self.index += 1; return .object }
                while true {
                    self.skipSpace()
                    try self.string()
                    self.skipSpace()
                    try self.expect(UInt8(ascii: ":"))
                    self.skipSpace()
                    _ = try self.value(depth: depth + 1)
                    self.skipSpace()
                    if self.peek == UInt8(ascii: ",") { self.index += 1; continue }
                    try self.expect(UInt8(ascii: "}"))
                    return .object
                }
            case UInt8(ascii: "["):
                self.index += 1
                self.skipSpace()
                if self.peek == UInt8(ascii: "]") { self.index += 1; return .array }
                while true {
                    self.skipSpace()
                    _ = try self.value(depth: depth + 1)
                    self.skipSpace()
                    if self.peek == UInt8(ascii: ",") { self.index += 1; continue }
                    try self.expect(UInt8(ascii: "]"))
                    return .array
                }
            case UInt8(ascii: "\""):
                try self.string()
                return .string
            case UInt8(ascii: "t"): try self.literal("true"); return .bool
            case UInt8(ascii: "f"): try self.literal("false"); return .bool
            case UInt8(ascii: "n"): try self.literal("null"); return .null
            default:
                try self.number()
                return .number
            }
        }

        mutating func literal(_ word: StaticString) throws(Failure) {
            let count = word.utf8CodeUnitCount
            guard self.index + count <= self.end else { throw Failure(offset: self.index, reason: "unexpected end") }
            for k in 0..<count where self.bytes[self.index + k] != word.utf8Start[k] {
                throw Failure(offset: self.index, reason: "invalid literal")
            }
            self.index += count
        }

        mutating func string() throws(Failure) {
            try self.expect(UInt8(ascii: "\""))
            if self.validated { return self.skipCheckedString() }
            while true {
                // A run of printable ASCII other than '"' and '\\' (nearly every byte of a task),
                // read without per-byte bounds checks.
                self.index = self.plainRun(from: self.index)
                guard let byte = self.peek else { break }
                self.index += 1
                switch byte {
                case UInt8(ascii: "\""): return
                case UInt8(ascii: "\\"):
                    guard let escaped = self.peek else { break }
                    switch escaped {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"), UInt8(ascii: "f"),
                         UInt8(ascii: "n"), UInt8(ascii: "r"), UInt8(ascii: "t"):
                        self.index += 1
                    case UInt8(ascii: "u"):
                        guard self.index + 5 <= self.end else { throw Failure(offset: self.index, reason: "bad \\u escape") }
                        _ = try JSONScan.hex4(self.bytes, self.index + 1)
                        self.index += 5
                    default: throw Failure(offset: self.index, reason: "invalid escape in a string")
                    }
                case 0..<0x20: throw Failure(offset: self.index - 1, reason: "control character in a string")
                case 0x80...0xFF: try self.utf8Sequence(lead: byte)
                default: continue
                }
            }
            throw Failure(offset: self.index, reason: "unterminated string")
        }

        /// Where the run of printable ASCII bytes other than '"' and '\\' starting at `start` ends.
        func plainRun(from start: Int) -> Int {
            let end = self.end
            return self.bytes.withUnsafeBufferPointer { buffer in
                var i = start
                while i < end {
                    let b = buffer[i]
                    if b < 0x20 || b >= 0x7F || b == 0x22 || b == 0x5C { break }
                    i += 1
                }
                return i
            }
        }

        /// Past the closing quote of a string already checked (an escape is two bytes at least;
        /// what follows its backslash is never a quote that ends the string).
        mutating func skipCheckedString() {
            let (start, end) = (self.index, self.end)
            self.index = self.bytes.withUnsafeBufferPointer { buffer in
                var i = start
                while i < end {
                    let b = buffer[i]
                    i += 1
                    if b == 0x22 { return i }
                    if b == 0x5C { i += 1 }
                }
                return min(i, end)
            }
        }

        /// The rest of a multi-byte UTF-8 sequence (RFC 3629: no overlong forms, no surrogates,
        /// nothing past U+10FFFF); JSON text is UTF-8 (RFC 8259).
        mutating func utf8Sequence(lead: UInt8) throws(Failure) {
            let start = self.index - 1
            let count: Int
            var low: UInt8 = 0x80, high: UInt8 = 0xBF
            switch lead {
            case 0xC2...0xDF: count = 1
            case 0xE0: count = 2; low = 0xA0
            case 0xE1...0xEC, 0xEE...0xEF: count = 2
            case 0xED: count = 2; high = 0x9F
            case 0xF0: count = 3; low = 0x90
            case 0xF1...0xF3: count = 3
            case 0xF4: count = 3; high = 0x8F
            default: throw Failure(offset: start, reason: "invalid UTF-8")
            }
            guard self.index + count <= self.end else { throw Failure(offset: start, reason: "invalid UTF-8") }
            let second = self.bytes[self.index]
            guard second >= low, second <= high else { throw Failure(offset: start, reason: "invalid UTF-8") }
            for k in 1..<count where self.bytes[self.index + k] & 0xC0 != 0x80 {
                throw Failure(offset: start, reason: "invalid UTF-8")
            }
            self.index += count
        }

        mutating func number() throws(Failure) {
            let start = self.index
            if self.validated {
                while let b = self.peek, (b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9")) || b == UInt8(ascii: "-") || b == UInt8(ascii: "+")
                        || b == UInt8(ascii: ".") || b == UInt8(ascii: "e") || b == UInt8(ascii: "E") { self.index += 1 }
                guard self.index > start else { throw Failure(offset: start, reason: "invalid value") }
                return
            }
            if self.peek == UInt8(ascii: "-") { self.index += 1 }
            func digits() -> Int {
                var n = 0
                while let b = self.peek, b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9") { self.index += 1; n += 1 }
                return n
            }
            let first = self.peek
            let integerDigits = digits()
            guard integerDigits > 0 else { throw Failure(offset: start, reason: "invalid value") }
            if first == UInt8(ascii: "0") && integerDigits > 1 { throw Failure(offset: start, reason: "leading zero in a number") }
            if self.peek == UInt8(ascii: ".") {
                self.index += 1
                guard digits() > 0 else { throw Failure(offset: self.index, reason: "invalid number") }
            }
            if self.peek == UInt8(ascii: "e") || self.peek == UInt8(ascii: "E") {
                self.index += 1
                if self.peek == UInt8(ascii: "+") || self.peek == UInt8(ascii: "-") { self.index += 1 }
                guard digits() > 0 else { throw Failure(offset: self.index, reason: "invalid number") }
            }
        }
    }
}
