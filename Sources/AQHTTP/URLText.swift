/// Small facts about an http(s) URL, read from its bytes: where it connects to, and how to show
/// it without its credentials. Pure.
public enum URLText {
    /// The parts of the authority: host (lowercased, IPv6 without brackets) and port.
    public struct Authority: Sendable, Hashable {
        public var scheme: String
        public var host: String
        public var port: Int
        /// `scheme://host:port`: what a per-host limit counts by.
        public var origin: String { "\(self.scheme)://\(self.host.contains(":") ? "[\(self.host)]" : self.host):\(self.port)" }
    }

    /// The authority of an `http://` or `https://` URL, or nil.
    public static func authority(_ url: String) -> Authority? {
        let utf8 = Array(url.utf8)
        func lower(_ b: UInt8) -> UInt8 { b >= 0x41 && b <= 0x5A ? b | 0x20 : b }
        let scheme: String
        var index: Int
        if utf8.count >= 7, utf8[0..<7].map(lower) == Array("http://".utf8) {
            scheme = "http"; index = 7
        } else if utf8.count >= 8, utf8[0..<8].map(lower) == Array("https://".utf8) {
            scheme = "https"; index = 8
        } else {
            return nil
        }
        var end = index
        while end < utf8.count, utf8[end] != UInt8(ascii: "/"), utf8[end] != UInt8(ascii: "?"), utf8[end] != UInt8(ascii: "#") { end += 1 }
        // Credentials end at the last '@' of the authority.
        if let at = utf8[index..<end].lastIndex(of: UInt8(ascii: "@")) { index = at + 1 }
        var hostEnd = end
        var port = scheme == "https" ? 443 : 80
        let hostStart = index
        if index < end, utf8[index] == UInt8(ascii: "[") {
            guard let close = utf8[index..<end].firstIndex(of: UInt8(ascii: "]")) else { return nil }
            hostEnd = close + 1
        } else if let colon = utf8[index..<end].lastIndex(of: UInt8(ascii: ":")) {
            hostEnd = colon
        }
        if hostEnd < end, utf8[hostEnd] == UInt8(ascii: ":") {
            let digits = utf8[(hostEnd + 1)..<end]
            guard !digits.isEmpty, digits.count <= 5, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                  let value = Int(String(decoding: digits, as: UTF8.self)), (1...65535).contains(value)
            else { return nil }
            port = value
        } else if hostEnd != end {
            return nil
        }
        var host = utf8[hostStart..<hostEnd].map(lower)
        if host.first == UInt8(ascii: "["), host.last == UInt8(ascii: "]") {
            host = Array(host.dropFirst().dropLast())
            guard host.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) || $0 == UInt8(ascii: ":") || $0 == UInt8(ascii: ".") }) else { return nil }
        } else {
            // Letters, digits, '-', '.' and '_' only: libcurl would percent-decode '%2E' or map
            // non-ASCII (IDN) to another name than the one the address policy looked at.
            guard host.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x2D || $0 == 0x2E || $0 == 0x5F }) else { return nil }
        }
        if host.last == UInt8(ascii: "."), host.count > 1 { host.removeLast() }
        guard !host.isEmpty else { return nil }
        return Authority(scheme: scheme, host: String(decoding: host, as: UTF8.self), port: port)
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
