// Builds broken variants of a model folder for the command-line cases of the hostile suite. Each variant
// links every file of the shipped model and replaces exactly one:
//   nested_config    transformer/config.json: "num_layers" nested 100000 arrays deep
//   nested_header    transformer weights: a 200 KB header whose first shape is nested 100000 deep
//   nan_transformer  transformer weights: one NaN in transformer_blocks.2.ff.net.2.weight
//   nan_classifier   classifier.safetensors: one +inf in conv1.weight
//   fifo_config      transformer/config.json is a FIFO (reading it must not block)
//   dir_weights      transformer weights are a directory
//   huge_sample      transformer/config.json: sample_size 16384 (workspaces far beyond any machine)
// Usage: hostile_make_models <model folder> <output folder>
#include <cstdio>
#include <exception>
#include <limits>

#include "hostile_inputs.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: hostile_make_models <model folder> <output folder>\n");
        return 2;
    }
    try {
        namespace fs = std::filesystem;
        const fs::path model = argv[1], out = hostile::fresh_dir(argv[2]);
        const auto variant = [&](const char* name) {
            const auto dir = out / name;
            hostile::link_tree(model, dir);
            return dir;
        };
        const std::string config = hostile::read_text(model / "transformer" / "config.json");
        const auto with_config = [&](const fs::path& dir, const std::string& key, const std::string& value) {
            const auto at = config.find("\"" + key + "\"");
            const auto colon = config.find(':', at), end = config.find_first_of(",}", colon);
            fs::remove(dir / "transformer" / "config.json");
            hostile::write_text(dir / "transformer" / "config.json",
                                config.substr(0, colon + 1) + " " + value + config.substr(end));
        };
        const fs::path weights = fs::path("transformer") / "diffusion_pytorch_model.safetensors";

        with_config(variant("nested_config"), "num_layers", hostile::nested_arrays(100000));

        const auto nested_header = variant("nested_header");
        fs::remove(nested_header / weights);
        hostile::write_raw_safetensors(nested_header / weights, R"({"w":{"dtype":"F32","shape":)" +
                                                                    hostile::nested_arrays(100000) +
                                                                    R"(,"data_offsets":[0,4]}})",
                                       4);

        const auto nan_transformer = variant("nan_transformer");
        hostile::make_private_copy(nan_transformer / weights);
        hostile::poke_float(nan_transformer / weights, "transformer_blocks.2.ff.net.2.weight", 7,
                            std::numeric_limits<float>::quiet_NaN());

        const auto nan_classifier = variant("nan_classifier");
        hostile::make_private_copy(nan_classifier / "classifier.safetensors");
        hostile::poke_float(nan_classifier / "classifier.safetensors", "conv1.weight", 3,
                            std::numeric_limits<float>::infinity());

        const auto fifo_config = variant("fifo_config");
        hostile::make_fifo(fifo_config / "transformer" / "config.json");

        const auto dir_weights = variant("dir_weights");
        fs::remove(dir_weights / weights);
        fs::create_directory(dir_weights / weights);

        with_config(variant("huge_sample"), "sample_size", "16384");

        // The learned weights: none at all, and a calibration cut in half.
        const auto no_learned = variant("no_learned");
        for (const auto& entry : fs::directory_iterator(no_learned))
            if (entry.path().filename().string().starts_with("learned_")) fs::remove(entry.path());
        const auto lying_learned = variant("lying_learned");
        const std::string learned = hostile::read_text(model / "learned_c3.json");
        fs::remove(lying_learned / "learned_c3.json");
        hostile::write_text(lying_learned / "learned_c3.json", learned.substr(0, learned.size() / 2));
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "hostile_make_models: %s\n", e.what());
        return 1;
    }
}
