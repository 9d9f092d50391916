// Hostile inputs, round 2 (issue 28), library cases: linear-time limits on every JSON text and safetensors
// header, outputs that are never half-written (interrupted, file too large), collisions between outputs and
// inputs, the classifier's work estimate, a file truncated while open, non-finite results and absurd learned
// weights. The command-line cases are in CMakeLists.txt (hostile/cli/r2_*).
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <limits>
#include <string>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../common/testing.hpp"
#include "demo/support.hpp"
#include "hostile_inputs.hpp"
#include "methods/learned_file.hpp"
#include "quality/classifier.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "sd3/safetensors.hpp"

namespace {

namespace fs = std::filesystem;

constexpr std::size_t short_message = 600;

template <class E, class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
    testing::expect_error<E>(std::forward<F>(f), fragments, short_message);
}

const fs::path& scratch() {
    static const fs::path dir = hostile::fresh_dir(fs::temp_directory_path() / ("specdiff_hostile2_" + std::to_string(::getpid())));
    return dir;
}

template <class F>
double seconds_of(F&& f) {
    const auto start = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Files in `dir` whose name holds ".partial-" (write_file's temporary files).
int partial_files(const fs::path& dir) {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir)) n += e.path().filename().string().find(".partial-") != std::string::npos;
    return n;
}

// A bound generous enough for an ASan build on a busy 2-core machine; the quadratic parser took minutes.
constexpr double seconds_allowed = 30.0;

}  // namespace

// ----- 1. linear-time limits ------------------------------------------------------------------------------

TEST_CASE("r2: 100,000 sibling objects in a sampling.json-like text parse in linear time") {
    std::string text = R"({"guidance_scale": 4.0)";
    for (int i = 0; i < 100000; ++i) text += ", \"k" + std::to_string(i) + "\": {}";
    text += "}";
    nlohmann::json j;
    const double s = seconds_of([&] { j = sd3::parse_json(text); });
    MESSAGE("100,000 siblings (", text.size(), " bytes): ", s, " s");
    CHECK(s < seconds_allowed);
    CHECK(j.size() == 100001);
    CHECK(j["guidance_scale"] == 4.0);
}

TEST_CASE("r2: a safetensors header listing 200,000 tensors opens in seconds") {
    const auto path = scratch() / "many.safetensors";
    std::string header = "{";
    for (int i = 0; i < 200000; ++i) {  // appends only: GCC 12 at -O3 flags `"," + std::string(...)` with a false -Wrestrict
        if (i) header += ',';
        header += "\"t";
        header += std::to_string(i);
        header += R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
    }
    header += "}";
    hostile::write_raw_safetensors(path, header);
    std::size_t count = 0;
    const double s = seconds_of([&] { count = sd3::safetensors_file(path).tensors().size(); });
    MESSAGE("200,000 tensors (", header.size(), " header bytes): ", s, " s");
    CHECK(count == 200000);
    CHECK(s < seconds_allowed);
}

TEST_CASE("r2: json_limits refuse by bytes, depth and entries, each by number, before parsing") {
    expect_error<std::runtime_error>([] { sd3::parse_json("[1,2,3,4,5]", {.max_bytes = 1 << 20, .max_depth = 64, .max_entries = 4}); },
                                     {"more than 4 entries"});
    CHECK_NOTHROW(sd3::parse_json("[1,2,3,4]", {.max_bytes = 1 << 20, .max_depth = 64, .max_entries = 4}));
    expect_error<std::runtime_error>([] { sd3::parse_json("[1,2,3]", {.max_bytes = 5, .max_depth = 64, .max_entries = 10}); },
                                     {"7 bytes, more than the limit of 5 bytes"});
    expect_error<std::runtime_error>([] { sd3::parse_json("[[[1]]]", {.max_bytes = 100, .max_depth = 2, .max_entries = 10}); },
                                     {"nested deeper than 2"});
    // Brackets and commas inside strings (escaped quotes too) are text, not structure.
    CHECK(sd3::parse_json(R"(["[[[,,,\"]]]"])", {.max_bytes = 100, .max_depth = 1, .max_entries = 1}).size() == 1);
    // A file's reader applies them and names the file.
    const auto path = scratch() / "entries.json";
    hostile::write_text(path, "[1,2,3]");
    expect_error<std::runtime_error>(
        [&] { sd3::read_json_file(path, "reader", "test file", {.max_bytes = 100, .max_depth = 64, .max_entries = 2}); },
        {"reader: '", "entries.json", "more than 2 entries"});
}

// ----- 2. outputs written atomically ------------------------------------------------------------------------

TEST_CASE("r2: SIGINT while write_file writes leaves the previous file intact and no temporary file") {
    const auto dir = hostile::fresh_dir(scratch() / "sigint");
    const auto path = dir / "out.raw";
    hostile::write_text(path, "previous");
    // 256 MB, written and fsync'd: long enough that the signal arrives before the rename.
    const std::vector<char> big(std::size_t{256} << 20, 'x');
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        std::signal(SIGINT, SIG_DFL);  // as in a tool (the test runner handles SIGINT itself)
        try {
            sd3::write_file(path, big, "--raw");
        } catch (...) {
        }
        ::_exit(0);
    }
    ::usleep(30 * 1000);
    ::kill(child, SIGINT);
    int status = 0;
    ::waitpid(child, &status, 0);
    if (!WIFSIGNALED(status)) {
        // The write beat the signal: then the new file must be whole.
        MESSAGE("the child finished its write before SIGINT; checking the new file is complete");
        CHECK(fs::file_size(path) == big.size());
    } else {
        CHECK(WTERMSIG(status) == SIGINT);
        CHECK(hostile::read_text(path) == "previous");
    }
    CHECK(partial_files(dir) == 0);
}

TEST_CASE("r2: a write past the file-size limit (EFBIG, as a full disk) throws and keeps the previous file") {
    const auto dir = hostile::fresh_dir(scratch() / "efbig");
    const auto path = dir / "out.json";
    hostile::write_text(path, "previous");
    rlimit old{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    auto* const old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit small = old;
    small.rlim_cur = 4096;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    const std::string text(100000, 'y');
    bool threw = false;
    std::string what;
    try {
        sd3::write_file(path, text, "--json");
    } catch (const std::runtime_error& e) {
        threw = true, what = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    INFO("message: ", what);
    CHECK(threw);
    CHECK(what.find("--json '") != std::string::npos);
    CHECK(what.find("write failed after 4096 of 100000 bytes") != std::string::npos);
    CHECK(what.find("previous file is unchanged") != std::string::npos);
    CHECK(hostile::read_text(path) == "previous");
    CHECK(partial_files(dir) == 0);
}

TEST_CASE("r2: write_file follows a symbolic link, keeps the file's permissions and refuses a device") {
    const auto dir = hostile::fresh_dir(scratch() / "links");
    hostile::write_text(dir / "real.json", "old");
    fs::permissions(dir / "real.json", fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read);
    fs::create_symlink(dir / "real.json", dir / "link.json");
    sd3::write_file(dir / "link.json", std::string("new"), "--json");
    CHECK(fs::is_symlink(dir / "link.json"));
    CHECK(hostile::read_text(dir / "real.json") == "new");
    CHECK((fs::status(dir / "real.json").permissions() & fs::perms::all) ==
          (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read));
    expect_error<std::runtime_error>([] { sd3::write_file("/dev/null", std::string("x"), "--out"); }, {"--out '/dev/null'", "character device"});
}

TEST_CASE("r2: file_plan refuses two outputs that are one file and an output that is an input, however spelled") {
    const auto dir = hostile::fresh_dir(scratch() / "plan");
    fs::create_directories(dir / "sub");
    fs::create_directories(dir / "model");
    hostile::write_text(dir / "model" / "model.json", "{}");
    fs::create_hard_link(dir / "model" / "model.json", dir / "hard.json");
    {
        sd3::file_plan plan;  // a new name, spelled two ways
        plan.output(dir / "a.png", "--out grid");
        plan.output(dir / "sub" / ".." / "a.png", "--json");
        expect_error<std::runtime_error>([&] { plan.check(); }, {"--json '", "is the same file as --out grid", "a.png"});
    }
    {
        sd3::file_plan plan;  // a hard link to an input
        plan.output(dir / "hard.json", "--raw");
        plan.input(dir / "model", "--model");
        expect_error<std::runtime_error>([&] { plan.check(); }, {"--raw '", "is an input (--model '", "model.json"});
    }
    {
        sd3::file_plan plan;  // distinct files pass
        plan.output(dir / "a.png", "--out");
        plan.output(dir / "b.json", "--json");
        plan.input(dir / "model", "--model");
        CHECK_NOTHROW(plan.check());
    }
}

// ----- 4. work estimates, 8. truncated file ----------------------------------------------------------------

TEST_CASE("r2: a classifier padded by 4096 is refused at load by its work, with the number and the limit") {
    const auto dir = scratch() / "padded";
    fs::remove_all(dir);
    hostile::link_tree(HOSTILE_MODEL_DIR, dir);
    std::string desc = hostile::read_text(fs::path(HOSTILE_MODEL_DIR) / "classifier.json");
    desc.replace(desc.find("\"padding\": 1"), 12, "\"padding\": 4096");
    fs::remove(dir / "classifier.json");
    hostile::write_text(dir / "classifier.json", desc);
    double s = 0;
    expect_error<std::runtime_error>([&] { s = seconds_of([&] { (void)quality::digit_classifier::load(dir); }); },
                                     {"classifier.json' layer 0", "x8222x8222 = 1081620544 values per image", "padding 4096", "the limit is 16777216"});
    CHECK(s < seconds_allowed);
    CHECK_NOTHROW((void)quality::digit_classifier::load(HOSTILE_MODEL_DIR));  // the shipped one is far below
}

TEST_CASE("r2: a safetensors file truncated while open is reported, not SIGBUS") {
    const auto path = scratch() / "shrinks.safetensors";
    const std::vector<float> values(4096, 1.0f);
    const sd3::tensor_to_save t{"w", {4096}, values, sd3::dtype::f32};
    sd3::save_safetensors(path, std::span(&t, 1));
    const sd3::safetensors_file file(path);
    fs::resize_file(path, 1000);
    expect_error<std::runtime_error>([&] { (void)file.read("w"); }, {"shrinks.safetensors", "truncated while open"});
}

// ----- 7. non-finite results, absurd learned weights --------------------------------------------------------

TEST_CASE("r2: non-finite results are written as \"inf\" / \"-inf\" / \"nan\", never null") {
    nlohmann::json j{{"fd", std::numeric_limits<double>::infinity()},
                     {"runs", {1.0, -std::numeric_limits<double>::infinity(), std::nan("")}},
                     {"missing", nullptr}};
    demo::mark_non_finite(j);
    CHECK(j["fd"] == "inf");
    CHECK(j["runs"][0] == 1.0);
    CHECK(j["runs"][1] == "-inf");
    CHECK(j["runs"][2] == "nan");
    CHECK(j["missing"].is_null());  // null keeps its one meaning: not measured
    CHECK(demo::json_number(2.5) == 2.5);
    CHECK(j.dump().find("null") == j.dump().rfind("null"));
}

TEST_CASE("r2: a learned weight of 1e30 is refused at load, naming the file and the entry") {
    const auto path = scratch() / "learned_c3.json";
    std::string text = hostile::read_text(fs::path(HOSTILE_MODEL_DIR) / "learned_c3.json");
    auto j = nlohmann::json::parse(text);
    [&] {
        for (auto& step : j["weights"])
            for (auto& row : step)
                if (row.is_array()) {
                    row[0] = 1e30;  // the first fitted weight
                    return;
                }
    }();
    hostile::write_text(path, j.dump());
    expect_error<std::runtime_error>([&] { (void)methods::load_learned_c3(path); },
                                     {"learned_c3.json", "1e+30", "outside the allowed [-1000, 1000]"});
    CHECK(methods::load_learned_c3(fs::path(HOSTILE_MODEL_DIR) / "learned_c3.json").has_value());
}
