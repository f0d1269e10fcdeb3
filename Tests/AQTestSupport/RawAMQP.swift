import Foundation

/// A hostile publisher: speaks AMQP 0-9-1 by hand over a plain socket, so a test can send
/// content headers that no well-behaved client library would build (empty field names, tables
/// nested thousands deep, tens of thousands of fields, header bytes of its choosing).
///
/// Blocking and minimal: PLAIN login, one channel in confirm mode, publish, wait for the confirm.
public final class RawAMQPPublisher {
    public struct Failure: Error, CustomStringConvertible { public var description: String }

    private let fd: Int32
    private var frameMax = 131_072
    private var nextTag: UInt64 = 1

    /// Connects and logs in to the broker `url` names (amqp://user:pass@host:port/vhost).
    public init(url: String) throws {
        guard let components = URLComponents(string: url), let host = components.host else { throw Failure(description: "bad url") }
        let port = components.port ?? 5672
        let user = components.user ?? "guest", password = components.password ?? "guest"
        var vhost = String(components.percentEncodedPath.dropFirst())
        vhost = vhost.isEmpty ? "/" : (vhost.removingPercentEncoding ?? vhost)
        self.fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard self.fd >= 0 else { throw Failure(description: "socket") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr(host == "localhost" ? "127.0.0.1" : host)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(self.fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { Glibc.close(self.fd); throw Failure(description: "connect to \(host):\(port) failed") }
        var timeout = timeval(tv_sec: 15, tv_usec: 0)
        _ = setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))

        try self.write(Array("AMQP".utf8) + [0, 0, 9, 1])
        _ = try self.expectMethod(channel: 0, 10, 10)  // connection.start
        var startOk = Encoder()
        startOk.method(10, 11)
        startOk.table([])
        startOk.shortString("PLAIN")
        startOk.longString([0] + Array(user.utf8) + [0] + Array(password.utf8))
        startOk.shortString("en_US")
        try self.sendMethod(channel: 0, startOk.bytes)
        let tune = try self.expectMethod(channel: 0, 10, 30)
        let brokerFrameMax = Int(tune[6]) << 24 | Int(tune[7]) << 16 | Int(tune[8]) << 8 | Int(tune[9])
        if brokerFrameMax > 0 { self.frameMax = min(self.frameMax, brokerFrameMax) }
        var tuneOk = Encoder()
        tuneOk.method(10, 31)
        tuneOk.u16(2047)
        tuneOk.u32(UInt32(self.frameMax))
        tuneOk.u16(0)
        try self.sendMethod(channel: 0, tuneOk.bytes)
        var open = Encoder()
        open.method(10, 40)
        open.shortString(vhost)
        open.shortString("")
        open.u8(0)
        try self.sendMethod(channel: 0, open.bytes)
        _ = try self.expectMethod(channel: 0, 10, 41)
        var channelOpen = Encoder()
        channelOpen.method(20, 10)
        channelOpen.shortString("")
        try self.sendMethod(channel: 1, channelOpen.bytes)
        _ = try self.expectMethod(channel: 1, 20, 11)
        var select = Encoder()
        select.method(85, 10)
        select.u8(0)
        try self.sendMethod(channel: 1, select.bytes)
        _ = try self.expectMethod(channel: 1, 85, 11)
    }

    deinit { self.close() }

    /// Publishes with raw property bytes (flags then fields, see ``Properties``) and waits for the
    /// broker's confirm: true for `basic.ack`, false for `basic.nack`.
    @discardableResult
    public func publish(exchange: String, routingKey: String, properties: [UInt8], body: [UInt8]) throws -> Bool {
        var method = Encoder()
        method.method(60, 40)
        method.u16(0)
        method.shortString(exchange)
        method.shortString(routingKey)
        method.u8(0)
        try self.sendMethod(channel: 1, method.bytes)
        var header = Encoder()
        header.u16(60)
        header.u16(0)
        header.u64(UInt64(body.count))
        header.bytes += properties
        try self.sendFrame(type: 2, channel: 1, header.bytes)
        var offset = 0
        while offset < body.count {
            let end = min(body.count, offset + self.frameMax - 8)
            try self.sendFrame(type: 3, channel: 1, Array(body[offset..<end]))
            offset = end
        }
        let tag = self.nextTag
        self.nextTag += 1
        while true {
            let (type, channel, payload) = try self.readFrame()
            guard type == 1, channel == 1, payload.count >= 4 else { continue }
            let classId = Int(payload[0]) << 8 | Int(payload[1]), methodId = Int(payload[2]) << 8 | Int(payload[3])
            if classId == 20 && methodId == 40 {
                throw Failure(description: "the broker closed the channel: \(String(decoding: payload.dropFirst(7), as: UTF8.self))")
            }
            guard classId == 60, methodId == 80 || methodId == 120 else { continue }
            let acked = payload[4..<12].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            if acked >= tag { return methodId == 80 }
        }
    }

    /// Property bytes for ``publish(exchange:routingKey:properties:body:)``.
    public enum Properties {
        /// Flags, then the fields in AMQP's order: headers (a raw encoded table), delivery mode,
        /// message id, user id.
        public static func make(headers: [UInt8]? = nil, persistent: Bool = true, messageId: String? = nil, userId: String? = nil) -> [UInt8] {
            var flags: UInt16 = 0
            var fields = Encoder()
            if let headers { flags |= 0x2000; fields.bytes += headers }
            if persistent { flags |= 0x1000; fields.u8(2) }
            if let messageId { flags |= 0x0080; fields.shortString(messageId) }
            if let userId { flags |= 0x0010; fields.shortString(userId) }
            var out = Encoder()
            out.u16(flags)
            return out.bytes + fields.bytes
        }
    }

    /// Field tables built byte by byte.
    public enum Table {
        /// A table of raw entries: (key bytes, value bytes with their type byte).
        public static func encode(_ entries: [([UInt8], [UInt8])]) -> [UInt8] {
            var inner: [UInt8] = []
            for (key, value) in entries { inner += [UInt8(key.count)] + key + value }
            var out = Encoder()
            out.u32(UInt32(inner.count))
            return out.bytes + inner
        }

        /// A long-string value (`S`).
        public static func string(_ text: String) -> [UInt8] {
            var out = Encoder()
            out.u8(UInt8(ascii: "S"))
            out.longString(Array(text.utf8))
            return out.bytes
        }

        /// A table value (`F`).
        public static func table(_ encoded: [UInt8]) -> [UInt8] { [UInt8(ascii: "F")] + encoded }

        /// Tables nested `depth` deep under empty keys: the most levels per byte a frame allows.
        public static func nested(depth: Int) -> [UInt8] {
            // Level k (k = depth outermost) is: its length 6k, an empty key, 'F', then level k-1;
            // level 0 is an empty table (length 0).
            var out = Encoder()
            out.bytes.reserveCapacity(6 * depth + 4)
            for k in stride(from: depth, through: 1, by: -1) {
                out.u32(UInt32(6 * k))
                out.u8(0)
                out.u8(UInt8(ascii: "F"))
            }
            out.u32(0)
            return out.bytes
        }

        /// `count` small fields with distinct keys.
        public static func many(_ count: Int) -> [UInt8] {
            self.encode((0..<count).map { (Array("k\($0)".utf8), [UInt8(ascii: "b"), 1]) })
        }
    }

    private var closed = false

    public func close() {
        guard !self.closed else { return }
        self.closed = true
        Glibc.close(self.fd)
    }

    // MARK: Frames

    private func sendMethod(channel: UInt16, _ payload: [UInt8]) throws { try self.sendFrame(type: 1, channel: channel, payload) }

    private func sendFrame(type: UInt8, channel: UInt16, _ payload: [UInt8]) throws {
        var frame = Encoder()
        frame.u8(type)
        frame.u16(channel)
        frame.u32(UInt32(payload.count))
        try self.write(frame.bytes + payload + [0xCE])
    }

    private func write(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw Failure(description: "send failed") }
            offset += n
        }
    }

    private func readExactly(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var offset = 0
        while offset < count {
            let n = out[offset...].withUnsafeMutableBytes { Glibc.recv(self.fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { throw Failure(description: "the broker closed the connection or did not answer") }
            offset += n
        }
        return out
    }

    private func readFrame() throws -> (UInt8, UInt16, [UInt8]) {
        let head = try self.readExactly(7)
        let size = Int(head[3]) << 24 | Int(head[4]) << 16 | Int(head[5]) << 8 | Int(head[6])
        let payload = try self.readExactly(size + 1)
        return (head[0], UInt16(head[1]) << 8 | UInt16(head[2]), Array(payload.dropLast()))
    }

    private func expectMethod(channel: UInt16, _ classId: Int, _ methodId: Int) throws -> [UInt8] {
        while true {
            let (type, ch, payload) = try self.readFrame()
            guard type == 1, ch == channel, payload.count >= 4 else { continue }
            let c = Int(payload[0]) << 8 | Int(payload[1]), m = Int(payload[2]) << 8 | Int(payload[3])
            if c == classId && m == methodId { return payload }
            if (c == 10 && m == 50) || (c == 20 && m == 40) {
                throw Failure(description: "closed: \(String(decoding: payload.dropFirst(7), as: UTF8.self))")
            }
        }
    }

    struct Encoder {
        var bytes: [UInt8] = []
        mutating func u8(_ v: UInt8) { self.bytes.append(v) }
        mutating func u16(_ v: UInt16) { self.bytes += [UInt8(v >> 8), UInt8(v & 0xFF)] }
        mutating func u32(_ v: UInt32) { for shift in stride(from: 24, through: 0, by: -8) { self.bytes.append(UInt8(truncatingIfNeeded: v >> UInt32(shift))) } }
        mutating func u64(_ v: UInt64) { for shift in stride(from: 56, through: 0, by: -8) { self.bytes.append(UInt8(truncatingIfNeeded: v >> UInt64(shift))) } }
        mutating func method(_ c: UInt16, _ m: UInt16) { self.u16(c); self.u16(m) }
        mutating func shortString(_ s: String) { self.u8(UInt8(s.utf8.count)); self.bytes += Array(s.utf8) }
        mutating func longString(_ b: [UInt8]) { self.u32(UInt32(b.count)); self.bytes += b }
        mutating func table(_ entries: [([UInt8], [UInt8])]) { self.bytes += Table.encode(entries) }
    }
}
