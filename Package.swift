// swift-tools-version:6.0
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "AsyncQueue",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "AMQPClient", targets: ["AMQPClient"]),
        .library(name: "AQTopology", targets: ["AQTopology"]),
        .executable(name: "aq", targets: ["AQCommand"]),
        .executable(name: "aq-bridge", targets: ["AQBridgeCommand"]),
        .executable(name: "aq-gateway", targets: ["AQGatewayCommand"]),
        .library(name: "AsyncQueue", targets: ["AsyncQueue"]),
        .executable(name: "aq-amqp-bench", targets: ["AMQPBenchmark"]),
        .executable(name: "aq-bench", targets: ["BridgeBenchmark"]),
        .executable(name: "aq-sign-bench", targets: ["SigningBenchmark"]),
        .executable(name: "aq-examples", targets: ["aq-examples"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.0.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    ],
    targets: [
        // C layers: headers and prefixed shims only.
        .systemLibrary(
            name: "CAQRabbitMQ",
            pkgConfig: "librabbitmq",
            providers: [.apt(["librabbitmq-dev"]), .brew(["rabbitmq-c"])]
        ),
        .systemLibrary(
            name: "CAQCurl",
            pkgConfig: "libcurl",
            providers: [.apt(["libcurl4-openssl-dev"]), .brew(["curl"])]
        ),
        .systemLibrary(
            name: "CAQOpenSSL",
            pkgConfig: "libcrypto",
            providers: [.apt(["libssl-dev"]), .brew(["openssl@3"])]
        ),

        // AMQP 0-9-1 client over rabbitmq-c.
        .target(
            name: "AMQPClient",
            dependencies: [
                "CAQRabbitMQ",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),

        // HTTP over libcurl.
        .target(name: "AQHTTP", dependencies: ["CAQCurl"], swiftSettings: swiftSettings),

        // The topology model, file format, plan/apply/export.
        .target(
            name: "AQTopology",
            dependencies: ["AMQPClient", "AQHTTP", .product(name: "Yams", package: "Yams")],
            swiftSettings: swiftSettings
        ),

        // aq-bridge: tasks from RabbitMQ to HTTP callbacks and webhooks.
        .target(
            name: "AQBridge",
            dependencies: ["AMQPClient", "AQHTTP", "AQTopology", "CAQOpenSSL", .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "AQBridgeCommand",
            dependencies: ["AQBridge", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swiftSettings
        ),
        // aq-gateway: the wire format over HTTP (Hummingbird 2 on SwiftNIO faces the network).
        .target(
            name: "AQGateway",
            dependencies: ["AMQPClient", "AQTopology", "AQBridge", "CAQOpenSSL", .product(name: "Hummingbird", package: "hummingbird"),
                           .product(name: "Yams", package: "Yams"), .product(name: "HTTPTypes", package: "swift-http-types"),
                           .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                           .product(name: "Logging", package: "swift-log")],
            exclude: ["openapi.yaml"],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "AQGatewayCommand",
            dependencies: ["AQGateway", "AQBridge", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swiftSettings
        ),
        // The Swift client for applications.
        .target(
            name: "AsyncQueue",
            dependencies: ["AMQPClient", "AQTopology"],
            swiftSettings: swiftSettings
        ),

        // `aq`: the command line.
        .executableTarget(
            name: "AQCommand",
            dependencies: ["AQTopology", "AMQPClient", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swiftSettings
        ),

        // The seed's patterns, run against aq-bridge by scripts/run.
        .executableTarget(
            name: "aq-examples",
            dependencies: ["AsyncQueue", "AQHTTP"],
            path: "examples/patterns",
            swiftSettings: swiftSettings
        ),

        // `aq-amqp-bench`: publish-with-confirms and consume rates.
        .executableTarget(
            name: "AMQPBenchmark",
            dependencies: ["AMQPClient"],
            swiftSettings: swiftSettings
        ),

        // `aq-bench`: one run of a bridge against our own publisher and HTTP sink (scripts/bench-bridge).
        .executableTarget(
            name: "BridgeBenchmark",
            dependencies: ["AMQPClient", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                           .product(name: "NIOHTTP1", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),

        // `aq-sign-bench`: what signing a request costs.
        .executableTarget(
            name: "SigningBenchmark",
            dependencies: ["AQBridge"],
            swiftSettings: swiftSettings
        ),

        // Helpers shared by the test targets (a plain target, not a product).
        .target(name: "AQTestSupport", path: "Tests/AQTestSupport", swiftSettings: swiftSettings),

        .testTarget(
            name: "AMQPClientTests",
            dependencies: ["AMQPClient", "CAQRabbitMQ", "CAQCurl"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "AQTopologyTests",
            dependencies: ["AQTopology", "AMQPClient", "AQCommand", "AQTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "AQBridgeTests",
            dependencies: ["AQBridge", "AQGateway", "AQHTTP", "AQTopology", "AMQPClient", "AsyncQueue", "AQTestSupport",
                           .product(name: "Yams", package: "Yams")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "AMQPClientIntegrationTests",
            dependencies: ["AMQPClient", "AQTestSupport"],
            swiftSettings: swiftSettings
        ),
    ]
)
