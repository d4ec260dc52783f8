/*
 * t_exports.c -- kvc-conform abi/only_export: a plugin exports exactly one
 * symbol, kvc_plugin_entry (KVC-REQ-2). Read from the file's own dynamic
 * symbol table (ELF, bounds-checked: the file may be anything), not from
 * dlsym, which cannot list what else is visible.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conform.h"

/* ---- only_export: the .dynsym of the file ------------------------------------------ */

typedef struct elf_file {
    const unsigned char *b;
    size_t size;
} elf_file;

/* Copies len bytes at off into dst; 0 when they lie outside the file. */
static int elf_read(const elf_file *f, uint64_t off, void *dst, size_t len)
{
    if (off > f->size || len > f->size - off)
        return 0;
    memcpy(dst, f->b + off, len);
    return 1;
}

/* The dynamic symbol table's place in the file. */
typedef struct dynsyms {
    uint64_t sym_off, n_syms, str_off, str_size;
} dynsyms;

/* File offset of a virtual address through the PT_LOAD segments; 0 when
 * none maps it (offset 0 is the ELF header, never a table). */
static uint64_t vaddr_to_off(const elf_file *f, const ElfW(Ehdr) *eh, uint64_t a)
{
    for (unsigned i = 0; i < eh->e_phnum; i++) {
        ElfW(Phdr) ph;
        if (!elf_read(f, eh->e_phoff + (uint64_t)i * sizeof ph, &ph, sizeof ph))
            return 0;
        if (ph.p_type == PT_LOAD && a >= ph.p_vaddr && a - ph.p_vaddr < ph.p_filesz)
            return a - ph.p_vaddr + ph.p_offset;
    }
    return 0;
}

/* Without section headers (sstrip'ed files): the dynamic segment names the
 * tables, and the hash table gives the symbol count. */
static const char *find_dynsyms_dynamic(const elf_file *f, const ElfW(Ehdr) *eh, dynsyms *d)
{
    if (eh->e_phentsize != sizeof(ElfW(Phdr)))
        return "no section headers and odd program headers";
    uint64_t symtab = 0, strtab = 0, strsz = 0, hash = 0, gnu_hash = 0;
    for (unsigned i = 0; i < eh->e_phnum; i++) {
        ElfW(Phdr) ph;
        if (!elf_read(f, eh->e_phoff + (uint64_t)i * sizeof ph, &ph, sizeof ph))
            return "program header outside the file";
        if (ph.p_type != PT_DYNAMIC)
            continue;
        for (uint64_t j = 0; j < ph.p_filesz / sizeof(ElfW(Dyn)); j++) {
            ElfW(Dyn) dy;
            if (!elf_read(f, ph.p_offset + j * sizeof dy, &dy, sizeof dy))
                return "dynamic segment outside the file";
            if (dy.d_tag == DT_NULL)
                break;
            if (dy.d_tag == DT_SYMTAB) symtab = dy.d_un.d_ptr;
            if (dy.d_tag == DT_STRTAB) strtab = dy.d_un.d_ptr;
            if (dy.d_tag == DT_STRSZ) strsz = dy.d_un.d_val;
            if (dy.d_tag == DT_HASH) hash = dy.d_un.d_ptr;
            if (dy.d_tag == DT_GNU_HASH) gnu_hash = dy.d_un.d_ptr;
        }
    }
    d->sym_off = vaddr_to_off(f, eh, symtab);
    d->str_off = vaddr_to_off(f, eh, strtab);
    d->str_size = strsz;
    if (!d->sym_off || !d->str_off)
        return "no dynamic symbol table (neither .dynsym nor DT_SYMTAB)";
    uint32_t w[4];
    if (hash) {
        if (!elf_read(f, vaddr_to_off(f, eh, hash), w, 8))
            return "DT_HASH outside the file";
        d->n_syms = w[1]; /* nchain = number of symbols */
        return NULL;
    }
    if (!gnu_hash)
        return "neither DT_HASH nor DT_GNU_HASH to count the symbols";
    /* GNU hash: the highest bucket start, then that chain to its end bit. */
    uint64_t gh = vaddr_to_off(f, eh, gnu_hash);
    if (!elf_read(f, gh, w, 16))
        return "DT_GNU_HASH outside the file";
    uint32_t nbuckets = w[0], symoffset = w[1], bloom = w[2];
    uint64_t buckets = gh + 16 + (uint64_t)bloom * sizeof(ElfW(Addr));
    uint32_t last = 0;
    for (uint32_t i = 0; i < nbuckets; i++) {
        uint32_t bk;
        if (!elf_read(f, buckets + 4ull * i, &bk, 4))
            return "GNU hash buckets outside the file";
        last = bk > last ? bk : last;
    }
    if (last < symoffset) {
        d->n_syms = symoffset;
        return NULL;
    }
    uint64_t chain = buckets + 4ull * nbuckets;
    for (;; last++) {
        uint32_t c;
        if (!elf_read(f, chain + 4ull * (last - symoffset), &c, 4))
            return "GNU hash chain outside the file";
        if (c & 1u)
            break;
    }
    d->n_syms = (uint64_t)last + 1;
    return NULL;
}

/* Finds .dynsym and its string table; NULL or the reason it cannot. */
static const char *find_dynsyms(const elf_file *f, dynsyms *d)
{
    ElfW(Ehdr) eh;
    if (!elf_read(f, 0, &eh, sizeof eh) || memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0)
        return "not an ELF file";
#if UINTPTR_MAX > 0xffffffffu
    if (eh.e_ident[EI_CLASS] != ELFCLASS64)
        return "not a 64-bit ELF file (this host is 64-bit)";
#else
    if (eh.e_ident[EI_CLASS] != ELFCLASS32)
        return "not a 32-bit ELF file (this host is 32-bit)";
#endif
    if (eh.e_shoff == 0 || eh.e_shnum == 0 || eh.e_shentsize != sizeof(ElfW(Shdr)))
        return find_dynsyms_dynamic(f, &eh, d);
    for (unsigned i = 0; i < eh.e_shnum; i++) {
        ElfW(Shdr) sh, st;
        if (!elf_read(f, eh.e_shoff + (uint64_t)i * sizeof sh, &sh, sizeof sh))
            return "section header outside the file";
        if (sh.sh_type != SHT_DYNSYM)
            continue;
        if (sh.sh_link >= eh.e_shnum ||
            !elf_read(f, eh.e_shoff + (uint64_t)sh.sh_link * sizeof st, &st, sizeof st))
            return ".dynsym names no valid string table";
        d->sym_off = sh.sh_offset;
        d->n_syms = sh.sh_size / sizeof(ElfW(Sym));
        d->str_off = st.sh_offset;
        d->str_size = st.sh_size;
        return NULL;
    }
    return find_dynsyms_dynamic(f, &eh, d);
}

/* Symbols the static linker defines in every shared object. */
static int linker_defined(const char *name)
{
    static const char *const names[] = {"_init", "_fini", "_edata", "_end", "__bss_start",
                                        "__bss_start__", "__bss_end__", "_bss_end__",
                                        "__end__", "_etext", NULL};
    for (int i = 0; names[i]; i++)
        if (strcmp(name, names[i]) == 0)
            return 1;
    return 0;
}

START_TEST(only_export)
{
    kc_env e;
    kc_load(&e);
    const char *path = kvch_plugin_path(e.lib);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ck_assert_msg(fd >= 0, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    ck_assert_msg(fstat(fd, &sb) == 0 && sb.st_size > 0, "cannot stat %s", path);
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    ck_assert_msg(map != MAP_FAILED, "cannot map %s: %s", path, strerror(errno));
    elf_file f = {map, (size_t)sb.st_size};

    dynsyms d;
    memset(&d, 0, sizeof d);
    const char *why = find_dynsyms(&f, &d);
    ck_assert_msg(why == NULL, "%s: %s", path, why);
    ck_assert_msg(d.n_syms < 1000000, "%s: %llu dynamic symbols: a damaged table", path,
                  (unsigned long long)d.n_syms);

    char extra[1024] = "";
    size_t used = 0;
    unsigned n_extra = 0, n_entry = 0, n_defined = 0;
    for (uint64_t i = 1; i < d.n_syms; i++) { /* index 0 is the null symbol */
        ElfW(Sym) s;
        ck_assert_msg(elf_read(&f, d.sym_off + i * sizeof s, &s, sizeof s),
                      "%s: dynamic symbol %llu lies outside the file", path,
                      (unsigned long long)i);
        if (s.st_shndx == SHN_UNDEF)
            continue; /* an import */
        int bind = ELF64_ST_BIND(s.st_info), type = ELF64_ST_TYPE(s.st_info);
        int vis = ELF64_ST_VISIBILITY(s.st_other);
        if (bind == STB_LOCAL || vis == STV_HIDDEN || vis == STV_INTERNAL)
            continue; /* not visible to other objects */
        if (type == STT_SECTION || type == STT_FILE)
            continue;
        ck_assert_msg(s.st_name < d.str_size, "%s: symbol %llu's name is outside the string "
                      "table", path, (unsigned long long)i);
        const char *name = (const char *)f.b + d.str_off + s.st_name;
        size_t room = d.str_size - s.st_name;
        ck_assert_msg(d.str_off + d.str_size <= f.size && memchr(name, 0, room) != NULL,
                      "%s: symbol %llu's name is not terminated", path, (unsigned long long)i);
        /* Version definitions (from a version script with a node name) are
         * absolute zero-valued objects, not code or data. */
        if (s.st_shndx == SHN_ABS && s.st_value == 0 && type == STT_OBJECT)
            continue;
        if (*name == '\0' || linker_defined(name))
            continue;
        n_defined++;
        if (strcmp(name, KVC_PLUGIN_ENTRY_SYMBOL) == 0) {
            n_entry++;
            ck_assert_msg(type == STT_FUNC || type == STT_GNU_IFUNC,
                          "%s: %s is exported, but not as a function (type %d)", path, name,
                          type);
            continue;
        }
        n_extra++;
        if (used + strlen(name) + 3 < sizeof extra)
            used += (size_t)snprintf(extra + used, sizeof extra - used, "%s%s",
                                     n_extra > 1 ? ", " : "", name);
    }
    munmap(map, (size_t)sb.st_size);
    ck_assert_msg(n_entry == 1, "%s does not export %s (KVC-REQ-2)", path,
                  KVC_PLUGIN_ENTRY_SYMBOL);
    ck_assert_msg(n_extra == 0,
                  "%s exports %u symbol%s besides %s: %s%s (KVC-REQ-2: link with "
                  "-fvisibility=hidden and plugins/kvc-plugin.map)",
                  path, n_extra, n_extra == 1 ? "" : "s", KVC_PLUGIN_ENTRY_SYMBOL, extra,
                  used + 32 >= sizeof extra ? ", ..." : "");
    kc_figure("%u export of %llu dynamic symbols", n_defined,
              (unsigned long long)(d.n_syms ? d.n_syms - 1 : 0));
    kc_unload(&e);
}
END_TEST

void kc_abi_exports(Suite *s)
{
    kc_add(s, "abi", "only_export", only_export, 20);
}
