/// Small facts about an http(s) URL, read from its bytes: where it connects to, and how to show
/// it without its credentials. Pure.
public enum URLText {
    /// The parts of the authority: host (lowercased, IPv6 without brackets) and port.
    public struct Authority: Sendable, Hashable {
        public var scheme: String
        public var host: String
        public var port: Int
        /// `scheme://host:port`: what a per-host limit counts by.
        public var origin: String {
            // (`utf8.contains`: `String.contains(String)` goes through Foundation's NSString search.)
            "\(self.scheme)://\(self.host.utf8.contains(UInt8(ascii: ":")) ? "[\(self.host)]" : self.host):\(self.port)"
        }
        public init(scheme: String, host: String, port: Int) {
            self.scheme = scheme
            self.host = host
            self.port = port
        }
    }

    /// The authority of an `http://` or `https://` URL, or nil.
    public static func authority(_ url: String) -> Authority? {
        var url = url
        return url.withUTF8 { bytes in
            guard let parts = self.authorityParts(bytes) else { return nil }
            var host = String(decoding: UnsafeBufferPointer(rebasing: bytes[parts.host]), as: UTF8.self)
            if host.utf8.contains(where: { $0 >= 0x41 && $0 <= 0x5A }) { host = host.lowercased() }
            return Authority(scheme: parts.https ? "https" : "http", host: host, port: parts.port)
        }
    }

    /// Whether `authority` would find a host and port in the URL's bytes (no allocation).
    public static func hasValidAuthority(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        self.authorityParts(bytes) != nil
    }

    /// Where the host is in the URL's bytes (brackets and a trailing dot excluded), its port,
    /// and its scheme; nil when the URL has no authority `authority` accepts.
    static func authorityParts(_ utf8: UnsafeBufferPointer<UInt8>) -> (https: Bool, host: Range<Int>, port: Int)? {
        func lower(_ b: UInt8) -> UInt8 { b >= 0x41 && b <= 0x5A ? b | 0x20 : b }
        func hasPrefix(_ p: StaticString) -> Bool {
            guard utf8.count >= p.utf8CodeUnitCount else { return false }
            for i in 0..<p.utf8CodeUnitCount where lower(utf8[i]) != p.utf8Start[i] { return false }
            return true
        }
        let https: Bool
        var index: Int
        if hasPrefix("http://") {
            https = false; index = 7
        } else if hasPrefix("https://") {
            https = true; index = 8
        } else {
            return nil
        }
        var end = index
        while end < utf8.count, utf8[end] != UInt8(ascii: "/"), utf8[end] != UInt8(ascii: "?"), utf8[end] != UInt8(ascii: "#") { end += 1 }
        // Credentials end at the last '@' of the authority.
        var at = end
        while at > index { at -= 1; if utf8[at] == UInt8(ascii: "@") { index = at + 1; break } }
        var hostEnd = end
        var port = https ? 443 : 80
        var hostStart = index
        if index < end, utf8[index] == UInt8(ascii: "[") {
            var close = index
            while close < end, utf8[close] != UInt8(ascii: "]") { close += 1 }
            guard close < end else { return nil }
            hostEnd = close + 1
        } else {
            var colon = end
            while colon > index { colon -= 1; if utf8[colon] == UInt8(ascii: ":") { hostEnd = colon; break } }
        }
        if hostEnd < end, utf8[hostEnd] == UInt8(ascii: ":") {
            let digits = (hostEnd + 1)..<end
            guard !digits.isEmpty, digits.count <= 5 else { return nil }
            var value = 0
            for i in digits {
                guard utf8[i] >= 0x30, utf8[i] <= 0x39 else { return nil }
                value = value * 10 + Int(utf8[i] - 0x30)
            }
            guard (1...65535).contains(value) else { return nil }
            port = value
        } else if hostEnd != end {
            return nil
        }
        if hostEnd - hostStart >= 2, utf8[hostStart] == UInt8(ascii: "["), utf8[hostEnd - 1] == UInt8(ascii: "]") {
            hostStart += 1; hostEnd -= 1
            for i in hostStart..<hostEnd {
                let b = lower(utf8[i])
                guard (b >= 0x30 && b <= 0x39) || (b >= 0x61 && b <= 0x66) || b == UInt8(ascii: ":") || b == UInt8(ascii: ".") else { return nil }
            }
        } else {
            // Letters, digits, '-', '.' and '_' only: libcurl would percent-decode '%2E' or map
            // non-ASCII (IDN) to another name than the one the address policy looked at.
            for i in hostStart..<hostEnd {
                let b = lower(utf8[i])
                guard (b >= 0x30 && b <= 0x39) || (b >= 0x61 && b <= 0x7A) || b == 0x2D || b == 0x2E || b == 0x5F else { return nil }
            }
        }
        if hostEnd - hostStart > 1, utf8[hostEnd - 1] == UInt8(ascii: ".") { hostEnd -= 1 }
        guard hostEnd > hostStart else { return nil }
        return (https, hostStart..<hostEnd, port)
    }

    /// The URL with any credentials (`user:password@`) replaced by `***@`, for logs and errors;
    /// cut to `limit` characters.
    public static func redacted(_ url: String, limit: Int = 200) -> String {
        var text = url
        if let schemeEnd = url.range(of: "://") {
            let rest = url[schemeEnd.upperBound...]
            // Up to the query, not the first '/': a password may hold an unescaped '/', and
            // hiding too much of a path in a log line is the safe mistake.
            let searchEnd = rest.firstIndex(where: { $0 == "?" || $0 == "#" }) ?? rest.endIndex
            if let at = rest[..<searchEnd].lastIndex(of: "@") {
                text = String(url[..<schemeEnd.upperBound]) + "***@" + String(url[url.index(after: at)...])
            }
        }
        return text.count > limit ? String(text.prefix(limit)) + "…" : text
    }
}
