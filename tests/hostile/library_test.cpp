// Hostile inputs against the engine's and the quality tools' loaders and checks, one class of defect per
// case (issue 10): nesting, overflowing products, non-finite weights, unwritable outputs, non-regular
// files, unbounded sizes, unclear option values. Every case asserts the exception type and the words of its
// message, and that the message stays short whatever the input's size.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <unistd.h>

#include "../common/testing.hpp"
#include "../engine/engine_fixture.hpp"
#include "hostile_inputs.hpp"
#include "quality/classifier.hpp"
#include "quality/default_model.hpp"
#include "quality/options.hpp"
#include "quality/png_grid.hpp"
#include "sd3/config.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "sd3/model.hpp"
#include "sd3/resources.hpp"
#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"

namespace {

namespace fs = std::filesystem;

// Longest message any case accepts: enough for the file's path and the reason, far below the inputs' sizes.
constexpr std::size_t short_message = 600;

// Every case also wants a short message.
template <class E, class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
    testing::expect_error<E>(std::forward<F>(f), fragments, short_message);
}

const fs::path& scratch() {
    static const fs::path dir = hostile::fresh_dir(fs::temp_directory_path() / ("specdiff_hostile_" + std::to_string(::getpid())));
    return dir;
}

// A model folder of the shipped model with every file linked, for variants that replace one file.
fs::path model_variant(const std::string& name) {
    const auto dir = scratch() / name;
    fs::remove_all(dir);
    hostile::link_tree(HOSTILE_MODEL_DIR, dir);
    return dir;
}


}  // namespace

// ----- 1. nesting -------------------------------------------------------------------------------------------

TEST_CASE("a safetensors header nested 100000 arrays deep is refused by its depth, not a stack overflow") {
    const auto path = scratch() / "nested.safetensors";
    hostile::write_raw_safetensors(path, R"({"w":{"dtype":"F32","shape":)" + hostile::nested_arrays(100000) +
                                             R"(,"data_offsets":[0,4]}})", 4);
    expect_error<std::runtime_error>([&] { sd3::safetensors_file f(path); },
                                     {"safetensors file", "nested.safetensors", "nested deeper than 64 levels"});
}

TEST_CASE("config.json with num_layers nested 100000 deep is refused by its depth") {
    const std::string text = R"({"_class_name": "SD3Transformer2DModel", "num_layers": )" + hostile::nested_arrays(100000) + "}";
    expect_error<std::invalid_argument>([&] { sd3::parse_transformer_config(text, "deep/config.json"); },
                                        {"deep/config.json", "nested deeper than 64 levels"});
    // Nesting the parser accepts is still reported by value, with the quoted value cut short.
    const std::string shallow = R"({"num_layers": )" + hostile::nested_arrays(60) + "}";
    expect_error<std::invalid_argument>([&] { sd3::parse_transformer_config(shallow, "config.json"); },
                                        {"num_layers must be an integer, got [[[", "bytes)"});
}

TEST_CASE("nesting is accepted up to max_json_depth levels and refused one level deeper") {
    CHECK_NOTHROW(sd3::parse_json(hostile::nested_arrays(sd3::max_json_depth)));
    expect_error<std::runtime_error>([] { sd3::parse_json(hostile::nested_arrays(sd3::max_json_depth + 1)); },
                                     {"nested deeper than 64"});
}

TEST_CASE("values quoted in messages are cut short: a 1 MB class name, tensor name and dtype") {
    const std::string huge(1 << 20, 'x');
    expect_error<std::invalid_argument>(
        [&] { sd3::parse_transformer_config(R"({"_class_name": ")" + huge + R"("})", "config.json"); },
        {"_class_name = \"xxx", "bytes)", "expected \"SD3Transformer2DModel\""});
    const auto path = scratch() / "long_names.safetensors";
    hostile::write_raw_safetensors(path, "{\"" + huge + R"(":{"dtype":")" + huge + R"(","shape":[1],"data_offsets":[0,4]}})", 4);
    expect_error<std::runtime_error>([&] { sd3::safetensors_file f(path); }, {"tensor 'xxx", "unsupported dtype", "bytes)"});
}

// ----- 3. overflowing products -----------------------------------------------------------------------------

TEST_CASE("tensor_info::numel neither overflows for [2^62, 2, 0] nor for a hand-built huge shape") {
    const auto path = scratch() / "zero_dim.safetensors";
    hostile::write_raw_safetensors(path, R"({"e":{"dtype":"F32","shape":[4611686018427387904,2,0],"data_offsets":[0,0]}})");
    const sd3::safetensors_file file(path);
    CHECK(file.info("e").numel() == 0);
    CHECK(file.read("e").empty());
    sd3::tensor_info t;
    t.shape = {std::int64_t{1} << 62, 4};
    CHECK(t.numel() == std::numeric_limits<std::int64_t>::max());  // saturates (UBSan would flag an overflow)
}

TEST_CASE("config products are checked: 65537 heads x 65536 head_dim, patch_size 65536") {
    auto c = test_util::small_config();
    c.num_attention_heads = 65537;
    c.attention_head_dim = 65536;
    c.caption_projection_dim = 1;
    CHECK(c.hidden() == std::numeric_limits<int>::max());  // saturated, not wrapped
    expect_error<std::invalid_argument>([&] { c.validate(); }, {"hidden width", "4295032832", "exceeds the limit 65536"});
    expect_error<std::invalid_argument>(
        [] { sd3::parse_transformer_config(R"({"num_attention_heads": 65537, "attention_head_dim": 65536})"); },
        {"config.json", "hidden width", "4295032832"});
    auto p = test_util::small_config();
    p.patch_size = 65536;
    expect_error<std::invalid_argument>([&] { p.validate(); }, {"patch_size^2 * in_channels", "17179869184"});
    expect_error<std::invalid_argument>([] { sd3::parse_transformer_config(R"({"num_layers": 18446744073709551615})"); },
                                        {"num_layers = 18446744073709551615", "out of range"});
}

// ----- 2, 6. threads and sizes bounded where the engine takes them --------------------------------------------

TEST_CASE("the engine bounds threads, a failed set_threads leaves the transformer unchanged") {
    const auto model = sd3::model::random(test_util::small_config(), 1);
    expect_error<std::invalid_argument>([&] { sd3::transformer net(model, {}, 100000); },
                                        {"threads = 100000", "out of range [1, 1024]"});
    sd3::transformer net(model, {}, 2);
    expect_error<std::invalid_argument>([&] { net.set_threads(0); }, {"threads = 0"});
    expect_error<std::invalid_argument>([&] { net.set_threads(sd3::max_threads + 1); }, {"threads = 1025"});
    CHECK(net.threads() == 2);
}

TEST_CASE("engine limits whose workspaces cannot fit are refused with the memory they need") {
    const auto model = sd3::model::random(test_util::small_config(), 2);
    expect_error<std::invalid_argument>([&] { sd3::transformer net(model, {.max_batch = 1 << 28, .max_context_tokens = 8}); },
                                        {"max_batch 268435456", "need", "TiB", "more than this machine's"});
    expect_error<std::invalid_argument>([&] { sd3::transformer net(model, {.max_batch = 1 << 30, .max_context_tokens = 8}); },
                                        {"max_batch/max_height/max_width = 1073741824/8/8", "2147483648 attention tasks"});
    expect_error<std::invalid_argument>(
        [&] { sd3::transformer net(model, {.max_batch = 2, .max_height = 1 << 30, .max_width = 1 << 30}); },
        {"engine_limits", "image tokens", "more than the engine indexes"});
    auto big = test_util::small_config();
    big.sample_size = 1 << 14;  // the default limits follow sample_size
    const auto big_model = sd3::model::random(big, 3);
    expect_error<std::invalid_argument>([&] { sd3::transformer net(big_model); }, {"max_height 16384", "need", "TiB"});
    expect_error<std::invalid_argument>([&] { sd3::kv_cache kv(test_util::small_config(), 1 << 30, 1 << 30); },
                                        {"kv_cache", "need", "more than this machine's"});
}

TEST_CASE("saturating size arithmetic and byte texts") {
    CHECK(sd3::saturating_product(1 << 30, 1 << 30, 1 << 30) == sd3::size_overflow);
    CHECK(sd3::saturating_product(-5, 7) == 0);
    CHECK(sd3::byte_text(sd3::size_overflow) == "more than 16 EiB");
    CHECK(sd3::byte_text(3 * 1024 * 1024) == "3.0 MiB");
    expect_error<std::invalid_argument>([] { sd3::require_memory("a test", sd3::size_overflow); },
                                        {"a test need more than 16 EiB", "of memory"});
}

TEST_CASE("a grid too large for memory or the PNG writer is refused before any pixel is allocated") {
    expect_error<std::invalid_argument>([] { quality::grid_size(100, 1, 32, 32, {.columns = 10, .scale = 3000}); },
                                        {"scale 3000", "limit is 32768 pixels a side"});
    expect_error<std::invalid_argument>(
        [] { quality::grid_size(std::size_t{1} << 40, 1, 32, 32, {.columns = std::size_t{1} << 40, .scale = 1}); },
        {"grid", "limit"});
    CHECK(quality::grid_size(100, 1, 32, 32, {.columns = 10, .scale = 2}).width == 10 * (64 + 2) + 2);
}

// ----- 5. non-finite weights and silently wrong values --------------------------------------------------------

TEST_CASE("a NaN transformer weight is named at load: file, tensor, element") {
    const auto dir = model_variant("nan_transformer");
    const auto weights = dir / "transformer" / "diffusion_pytorch_model.safetensors";
    hostile::make_private_copy(weights);
    hostile::poke_float(weights, "transformer_blocks.1.attn.to_k.weight", 5, std::numeric_limits<float>::quiet_NaN());
    expect_error<std::runtime_error>([&] { sd3::model::load(dir / "transformer"); },
                                     {"diffusion_pytorch_model.safetensors", "transformer_blocks.1.attn.to_k.weight",
                                      "element 5", "nan", "must be finite"});
}

TEST_CASE("an infinite classifier weight or class embedding is named at load") {
    const auto dir = model_variant("inf_classifier");
    hostile::make_private_copy(dir / "classifier.safetensors");
    hostile::poke_float(dir / "classifier.safetensors", "fc2.weight", 9, -std::numeric_limits<float>::infinity());
    expect_error<std::runtime_error>([&] { quality::digit_classifier::load(dir); }, {"classifier.safetensors", "fc2.weight", "-inf"});
    hostile::make_private_copy(dir / "class_embeddings.safetensors");
    hostile::poke_float(dir / "class_embeddings.safetensors", "pooled", 0, std::numeric_limits<float>::quiet_NaN());
    expect_error<std::runtime_error>([&] { quality::class_embeddings::load(dir); }, {"class_embeddings.safetensors", "'pooled'", "nan"});
}

TEST_CASE("scheduler shifts that are not usable are named: -1, NaN, 1e308") {
    expect_error<std::invalid_argument>([] { sd3::flow_match_euler s(28, -1.0); }, {"shift = -1", "finite and > 0"});
    expect_error<std::invalid_argument>([] { sd3::flow_match_euler s(28, std::nan("")); }, {"shift = nan"});
    expect_error<std::invalid_argument>([] { sd3::flow_match_euler s(28, 1e308); }, {"shift = 1e+308", "gives sigma", "outside [0, 1]"});
    expect_error<std::invalid_argument>([] { sd3::flow_match_euler s(1 << 30, 3.0); }, {"steps = 1073741824", "out of range"});
    const auto dir = hostile::fresh_dir(scratch() / "shift");
    hostile::write_text(dir / "scheduler_config.json", R"({"shift": 1e308})");
    expect_error<std::runtime_error>([&] { quality::load_scheduler_shift(dir); }, {"scheduler_config.json", "has shift 1e+308", "allowed"});
}

TEST_CASE("seeds are parsed strictly: -1 and 2^64 are refused, 2^64 - 1 is accepted") {
    expect_error<std::invalid_argument>([] { quality::parse_seed("-1"); }, {"'-1'", "not a non-negative integer", "18446744073709551615"});
    expect_error<std::invalid_argument>([] { quality::parse_seed("18446744073709551616"); }, {"out of range"});
    expect_error<std::invalid_argument>([] { quality::parse_seed("12abc"); }, {"'12abc'"});
    CHECK(quality::parse_seed("18446744073709551615") == std::numeric_limits<std::uint64_t>::max());
    CHECK(quality::parse_seed("0") == 0);
}

// ----- 8. option messages name the value and what is allowed -------------------------------------------------

TEST_CASE("option checks say what was given and what is allowed") {
    CHECK(quality::check_real("abc", 0, 1, quality::interval::open_above) == "'abc' is not a finite number; allowed: [0, 1)");
    CHECK(quality::check_real("1", 0, 1, quality::interval::open_above) == "'1' is out of range; allowed: [0, 1)");
    CHECK(quality::check_real("nan", 0, 100) == "'nan' is not a finite number; allowed: [0, 100]");
    CHECK(quality::check_real("0.5", 0, 1).empty());
    CHECK(quality::check_integer("1e9", 1, 1000) == "'1e9' is not an integer; allowed: 1 to 1000");
    CHECK(quality::check_integer("99999999999999999999", 1, 1000) == "'99999999999999999999' is out of range; allowed: 1 to 1000");
    CHECK(quality::check_integer("-3", 1, 1000) == "'-3' is out of range; allowed: 1 to 1000");
    CHECK(quality::check_integer("", 1, 1000) == "'' is not an integer; allowed: 1 to 1000");
    CHECK(quality::check_integer("1000", 1, 1000).empty());
    CHECK(quality::check_integer(std::string(1 << 20, '7'), 1, 10).size() < short_message);
}

TEST_CASE("classifier.json sizes are bounded: negative stride, huge padding, absurd classes") {
    const auto dir = model_variant("bad_classifier_json");
    std::string json = hostile::read_text(fs::path(HOSTILE_MODEL_DIR) / "classifier.json");
    const auto at = json.find("\"padding\": 1");
    REQUIRE(at != std::string::npos);
    fs::remove(dir / "classifier.json");
    hostile::write_text(dir / "classifier.json", json.substr(0, at) + "\"padding\": 18446744073709551615" + json.substr(at + 12));
    expect_error<std::runtime_error>([&] { quality::digit_classifier::load(dir); }, {"classifier.json", "layer 0", "padding", "[0, 4096]"});
    fs::remove(dir / "classifier.json");
    hostile::write_text(dir / "classifier.json", json.substr(0, at) + "\"padding\": -1" + json.substr(at + 12));
    expect_error<std::runtime_error>([&] { quality::digit_classifier::load(dir); }, {"padding = -1"});
}

// ----- 7. inputs that are not regular files -------------------------------------------------------------------

TEST_CASE("a directory, a FIFO or a device where a file is expected is named as such, without blocking") {
    const auto dir = hostile::fresh_dir(scratch() / "not_files");
    fs::create_directory(dir / "folder.safetensors");
    expect_error<std::runtime_error>([&] { sd3::safetensors_file f(dir / "folder.safetensors"); },
                                     {"safetensors file", "folder.safetensors", "is a directory, expected a regular file"});
    hostile::make_fifo(dir / "pipe.safetensors");
    expect_error<std::runtime_error>([&] { sd3::safetensors_file f(dir / "pipe.safetensors"); }, {"is a FIFO"});
    hostile::make_fifo(dir / "config.json");
    expect_error<std::runtime_error>([&] { sd3::load_transformer_config(dir / "config.json"); }, {"transformer config", "is a FIFO"});
    expect_error<std::runtime_error>([] { sd3::safetensors_file f("/dev/zero"); }, {"'/dev/zero'", "is a character device"});
    expect_error<std::runtime_error>([] { sd3::read_text_file("/dev/zero", "a role"); }, {"a role '/dev/zero'", "character device"});
    hostile::write_text(dir / "empty.json", "");
    expect_error<std::runtime_error>([&] { sd3::load_transformer_config(dir / "empty.json"); }, {"empty.json", "is empty"});
    CHECK(sd3::describe_file_type(dir / "missing") == "missing");
}

// ----- 4. outputs that cannot be written ----------------------------------------------------------------------

TEST_CASE("outputs: a directory, /dev/full and a missing folder fail naming the path, before and while writing") {
    const auto dir = hostile::fresh_dir(scratch() / "outputs");
    const std::string text = "{}";
    expect_error<std::runtime_error>([&] { sd3::require_writable_file(dir, "--json"); }, {"--json", "is a directory"});
    expect_error<std::runtime_error>([&] { sd3::require_writable_file(dir / "no" / "x.json", "--json"); },
                                     {"--json", "its folder", "does not exist"});
    hostile::write_text(dir / "plain", "x");
    expect_error<std::runtime_error>([&] { sd3::require_writable_file(dir / "plain" / "x.json", "--json"); },
                                     {"its parent", "is a regular file"});
    expect_error<std::runtime_error>([] { sd3::require_writable_file("/dev/full", "--json"); }, {"'/dev/full'", "character device"});
    expect_error<std::runtime_error>([&] { sd3::write_file(dir, text, "--json"); }, {"--json", "is a directory"});
    expect_error<std::runtime_error>([] { sd3::write_file("/dev/full", std::string("{}"), "--raw"); }, {"--raw '/dev/full'", "character device"});
    expect_error<std::runtime_error>([&] { sd3::prepare_output_folder(dir / "plain", "--out"); }, {"--out", "expected a folder"});
    const std::vector<float> image(16, 0.0f);
    expect_error<std::runtime_error>([&] { quality::write_png_grid(dir, {image, 1, 1, 4, 4}); }, {"write_png_grid", "is a directory"});
    expect_error<std::runtime_error>([&] { sd3::save_safetensors(dir, {}); }, {"save_safetensors", "is a directory"});
    CHECK_NOTHROW(sd3::write_file(dir / "ok.json", text, "--json"));
    CHECK(hostile::read_text(dir / "ok.json") == "{}");
}
