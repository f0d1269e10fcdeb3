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
        .executable(name: "aq-amqp-bench", targets: ["AMQPBenchmark"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
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

        // AMQP 0-9-1 client over rabbitmq-c.
        .target(
            name: "AMQPClient",
            dependencies: [
                "CAQRabbitMQ",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),

        // `aq-amqp-bench`: publish-with-confirms and consume rates.
        .executableTarget(
            name: "AMQPBenchmark",
            dependencies: ["AMQPClient"],
            swiftSettings: swiftSettings
        ),

        .testTarget(
            name: "AMQPClientTests",
            dependencies: ["AMQPClient", "CAQRabbitMQ", "CAQCurl"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "AMQPClientIntegrationTests",
            dependencies: ["AMQPClient"],
            swiftSettings: swiftSettings
        ),
    ]
)
