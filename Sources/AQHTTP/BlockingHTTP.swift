internal import CAQCurl
import Foundation

/// An HTTP answer.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    public var bodyString: String { String(decoding: self.body, as: UTF8.self) }

    public func header(_ name: String) -> String? {
        self.headers.last { $0.name.caseInsensitiveCompare(name) == .orderedSame }?.value
    }
}

/// A failed HTTP exchange: the request never got an answer.
public struct HTTPError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        case invalidURL, couldNotResolve, couldNotConnect, timeout, tls, tooLarge, other
        /// The request was not sent: its address is refused by the ``AddressPolicy``.
        case refused
        /// The request was not sent: it cannot be put on the wire as given (a header with CR/LF).
        case invalidRequest
    }
    public var kind: Kind
    public var message: String
    public var curlCode: Int32?
    public var description: String { self.message }

    public init(kind: Kind, message: String, curlCode: Int32? = nil) {
        self.kind = kind
        self.message = message
        self.curlCode = curlCode
    }
}

/// libcurl, once per process.
enum CurlGlobal {
    static let initialized: Bool = {
        curl_global_init(Int(CURL_GLOBAL_DEFAULT)) == CURLE_OK
    }()

    static func kind(of code: CURLcode) -> HTTPError.Kind {
        switch code {
        case CURLE_URL_MALFORMAT, CURLE_UNSUPPORTED_PROTOCOL: return .invalidURL
        case CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_RESOLVE_PROXY: return .couldNotResolve
        case CURLE_COULDNT_CONNECT: return .couldNotConnect
        case CURLE_OPERATION_TIMEDOUT: return .timeout
        case CURLE_SSL_CONNECT_ERROR, CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CERTPROBLEM, CURLE_SSL_CIPHER, CURLE_SSL_CACERT_BADFILE:
            return .tls
        case CURLE_WRITE_ERROR, CURLE_FILESIZE_EXCEEDED: return .tooLarge
        default: return .other
        }
    }
}

/// One blocking HTTP request with libcurl's easy interface, for command-line tools (the
/// management API). Do not call it on the cooperative pool; ``request(…)`` hops off it.
public enum BlockingHTTP {
    public static func request(
        method: String, url: String, headers: [String] = [], body: [UInt8]? = nil,
        username: String? = nil, password: String? = nil, timeout: Duration = .seconds(15),
        maxResponseBytes: Int = 64 << 20
    ) async throws -> HTTPResponse {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<HTTPResponse, any Error>) in
            DispatchQueue.global().async {
                continuation.resume(with: Result {
                    try self.perform(method: method, url: url, headers: headers, body: body, username: username,
                                     password: password, timeout: timeout, maxResponseBytes: maxResponseBytes)
                })
            }
        }
    }

    final class Sink {
        var body: [UInt8] = []
        var headers: [(name: String, value: String)] = []
        var limit: Int
        init(limit: Int) { self.limit = limit }
    }

    static func perform(
        method: String, url: String, headers: [String], body: [UInt8]?, username: String?, password: String?,
        timeout: Duration, maxResponseBytes: Int
    ) throws -> HTTPResponse {
        _ = CurlGlobal.initialized
        guard let handle = curl_easy_init() else {
            throw HTTPError(kind: .other, message: "libcurl could not create a handle")
        }
        defer { curl_easy_cleanup(handle) }
        let sink = Sink(limit: maxResponseBytes)
        var headerList: UnsafeMutablePointer<curl_slist>?
        defer { curl_slist_free_all(headerList) }
        for header in headers { headerList = curl_slist_append(headerList, header) }
        var errorBuffer = [CChar](repeating: 0, count: Int(CURL_ERROR_SIZE) + 1)
        let code: CURLcode = withExtendedLifetime(sink) {
            let context = Unmanaged.passUnretained(sink).toOpaque()
            _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_URL, url)
            _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_CUSTOMREQUEST, method)
            _ = aq_curl_easy_setopt_long(handle, CURLOPT_NOSIGNAL, 1)
            // Whole milliseconds, at least 1: libcurl reads 0 as "no timeout" (a 300 ms timeout
            // counted in whole seconds was 0, and the request could wait for ever).
            let (seconds, attoseconds) = timeout.components
            _ = aq_curl_easy_setopt_long(handle, CURLOPT_TIMEOUT_MS, max(1, Int(seconds) * 1000 + Int(attoseconds / 1_000_000_000_000_000)))
            _ = aq_curl_easy_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, Int(min(timeout, .seconds(10)).components.seconds * 1000))
            _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_PROTOCOLS_STR, "http,https")
            if let headerList { _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_HTTPHEADER, headerList) }
            if let username {
                _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_USERNAME, username)
                _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_PASSWORD, password ?? "")
            }
            _ = aq_curl_easy_setopt_data_callback(handle, CURLOPT_WRITEFUNCTION) { data, size, count, context in
                guard let data, let context else { return 0 }
                let sink = Unmanaged<Sink>.fromOpaque(context).takeUnretainedValue()
                let length = size * count
                if sink.body.count + length > sink.limit { return 0 }
                sink.body.append(contentsOf: UnsafeRawBufferPointer(start: data, count: length))
                return length
            }
            _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_WRITEDATA, context)
            _ = aq_curl_easy_setopt_data_callback(handle, CURLOPT_HEADERFUNCTION) { data, size, count, context in
                guard let data, let context else { return 0 }
                let sink = Unmanaged<Sink>.fromOpaque(context).takeUnretainedValue()
                let line = String(decoding: UnsafeRawBufferPointer(start: data, count: size * count), as: UTF8.self)
                if let colon = line.firstIndex(of: ":") {
                    sink.headers.append((String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespacesAndNewlines)))
                }
                return size * count
            }
            _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_HEADERDATA, context)
            return errorBuffer.withUnsafeMutableBufferPointer { buffer in
                _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_ERRORBUFFER, buffer.baseAddress)
                if let body {
                    return body.withUnsafeBytes { raw in
                        _ = aq_curl_easy_setopt_long(handle, CURLOPT_POSTFIELDSIZE, raw.count)
                        _ = aq_curl_easy_setopt_ptr(handle, CURLOPT_POSTFIELDS, raw.baseAddress)
                        return curl_easy_perform(handle)
                    }
                }
                return curl_easy_perform(handle)
            }
        }
        guard code == CURLE_OK else {
            let detail = String(decoding: errorBuffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let text = detail.isEmpty ? String(cString: curl_easy_strerror(code)) : detail
            throw HTTPError(kind: CurlGlobal.kind(of: code), message: "\(method) \(url): \(text)", curlCode: Int32(code.rawValue))
        }
        var status = 0
        _ = aq_curl_easy_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &status)
        return HTTPResponse(status: status, headers: sink.headers, body: sink.body)
    }
}
